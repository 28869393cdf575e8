"""Reading the profile forms: bounded parsing, and every field's error at once.

Validation itself is `subscribers.ProfileSpec.from_mapping`, the same rules as the CLI and the
importer. It stops at the first bad field, so each field is also checked on its own against
known-good values for the others: a person sees everything to fix in one round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from zoneinfo import available_timezones

from starlette.datastructures import UploadFile
from starlette.requests import Request

from newsletter.models import Subscriber, SubscriberStatus
from newsletter.subscribers import MAX_ITEMS_LIMIT, InvalidProfile, ProfileSpec

# Per-field character limits: generous for real use, small enough that a hostile form is
# refused before any parsing work. 50 keywords of 80 characters fit in the keyword fields.
FIELD_LIMITS = {
    "email": 320,
    "keywords": 4500,
    "exclude": 4500,
    "timezone": 64,
    "send_hour": 8,
    "max_items": 8,
    "frequency": 16,
    "action": 16,
    "csrf_token": 256,
    "List-Unsubscribe": 32,
}
MAX_FIELDS = len(FIELD_LIMITS)
MAX_PART_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024  # whole request body, enforced by Starlette before parsing

_DEFAULTS = {"max_items": "10", "timezone": "UTC", "send_hour": "7"}
PROFILE_FIELDS = ("email", "keywords", "exclude", "max_items", "timezone", "send_hour")
FREQUENCIES = ("daily", "weekly", "paused")
_GOOD = {
    "email": "someone@example.org",
    "keywords": "x1",
    "exclude": "",
    "max_items": "10",
    "timezone": "UTC",
    "send_hour": "7",
    "frequency": "daily",
}


async def read_form(request: Request) -> dict[str, str]:
    """The first value of each known text field; files and unknown fields are dropped."""
    form = await request.form(max_files=0, max_fields=MAX_FIELDS * 2, max_part_size=MAX_PART_BYTES)
    out: dict[str, str] = {}
    for key, value in form.multi_items():
        if key in FIELD_LIMITS and key not in out and not isinstance(value, UploadFile):
            out[key] = value
    return out


def _multiline(text: str) -> str:
    # Browsers send textarea line breaks as CRLF; keywords are split on LF (and commas), and
    # a lone CR would be refused as a control character.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _field_of(message: str) -> tuple[str, str]:
    name, sep, rest = message.partition(": ")
    if sep and name in _GOOD:
        return name, rest[:1].upper() + rest[1:]
    return "form", message


@dataclass
class ProfileForm:
    """What the form shows: the person's own input (kept on errors), errors by field, and the
    validated profile when there were none."""

    values: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)
    spec: ProfileSpec | None = None

    @property
    def ok(self) -> bool:
        return self.spec is not None and not self.errors

    def keyword_list(self, name: str = "keywords") -> list[str]:
        """Best-effort keywords for a preview, even while another field is invalid."""
        try:
            spec = ProfileSpec.from_mapping({**_GOOD, name: self.values.get(name, "")})
        except InvalidProfile:
            return []
        return list(spec.keywords if name == "keywords" else spec.exclude)

    def max_items(self) -> int:
        try:
            return max(1, min(MAX_ITEMS_LIMIT, int(self.values.get("max_items", "10"))))
        except ValueError:
            return 10


def blank_form() -> ProfileForm:
    return ProfileForm(
        {
            "email": "",
            "keywords": "",
            "exclude": "",
            "max_items": "10",
            "timezone": "UTC",
            "send_hour": "7",
            "frequency": "daily",
        }
    )


def subscriber_form(sub: Subscriber) -> ProfileForm:
    frequency = "paused" if sub.status is SubscriberStatus.PAUSED else sub.frequency.value
    return ProfileForm(
        {
            "email": sub.email,
            "keywords": "\n".join(sub.keywords),
            "exclude": "\n".join(sub.exclude),
            "max_items": str(sub.max_items),
            "timezone": sub.timezone,
            "send_hour": str(sub.send_hour),
            "frequency": frequency,
        }
    )


def validate(raw: Mapping[str, str], *, email: str | None = None) -> ProfileForm:
    """Validate a subscribe form, or (with `email` fixed) a manage form, which also has a
    frequency of daily, weekly or paused."""
    values = {name: raw.get(name, "").strip() for name in PROFILE_FIELDS}
    for name, default in _DEFAULTS.items():
        values[name] = values[name] or default  # left empty: the same as not chosen
    values["keywords"] = _multiline(raw.get("keywords", ""))
    values["exclude"] = _multiline(raw.get("exclude", ""))
    if email is not None:
        values["email"] = email
    values["frequency"] = raw.get("frequency", "daily").strip().lower()
    form = ProfileForm(values)
    for name in PROFILE_FIELDS:
        limit = FIELD_LIMITS[name]
        if len(values[name]) > limit:
            form.errors[name] = f"Too long: at most {limit} characters."
    if values["frequency"] not in FREQUENCIES:
        form.errors["frequency"] = "Choose daily, weekly or paused."
    candidate: dict[str, Any] = {name: values[name] for name in PROFILE_FIELDS}
    candidate["frequency"] = "daily" if values["frequency"] == "paused" else values["frequency"]
    for name in PROFILE_FIELDS:
        if name in form.errors:
            continue
        try:
            ProfileSpec.from_mapping({**_GOOD, name: candidate[name]})
        except InvalidProfile as exc:
            where, text = _field_of(str(exc))
            form.errors[name if where == "form" else where] = text
    if not form.errors:
        try:
            form.spec = ProfileSpec.from_mapping(candidate)
        except InvalidProfile as exc:  # a rule that spans fields; none today, but be safe
            where, text = _field_of(str(exc))
            form.errors[where] = text
    return form


@lru_cache(maxsize=1)
def timezone_groups() -> list[tuple[str, list[str]]]:
    """IANA zones grouped by area for the <select>; UTC first, legacy aliases left out."""
    groups: dict[str, list[str]] = {}
    for name in sorted(available_timezones()):
        area, sep, _ = name.partition("/")
        if not sep or area in {"Etc", "SystemV", "US", "Canada", "Brazil", "Chile", "Mexico"}:
            continue
        groups.setdefault(area, []).append(name)
    return [("", ["UTC"]), *sorted(groups.items())]


def timezone_options(current: str) -> list[tuple[str, list[str]]]:
    """The groups, plus the person's current zone if it is one we would otherwise hide."""
    groups = timezone_groups()
    if any(current in names for _, names in groups) or not current:
        return groups
    return [("", ["UTC", current]), *groups[1:]]
