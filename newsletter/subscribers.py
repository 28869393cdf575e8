"""Subscriber profiles: validation, and the one-TOML-file-per-subscriber format that the CLI
imports and exports (the `subscribers/` folder).

Validation lives here once, so the CLI, the importer and the web forms all refuse the same
things with the same words.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import tomli_w
from email_validator import EmailNotValidError
from email_validator import validate_email as _validate_email
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from newsletter.matching import validate_keyword
from newsletter.models import DeliveryItem, Frequency, Subscriber, SubscriberStatus

MAX_KEYWORDS = 50
MAX_ITEMS_LIMIT = 50
PROFILE_KEYS = {
    "email",
    "keywords",
    "exclude",
    "max_items",
    "timezone",
    "send_hour",
    "frequency",
    "status",
}


class InvalidProfile(ValueError):
    """A profile field is unusable; the message names the field and says what is allowed."""


def validate_email(raw: str) -> str:
    """A real validator (syntax, length, IDN), no DNS lookups: those belong to delivery."""
    if not isinstance(raw, str) or any(c in raw for c in "\r\n\0"):
        raise InvalidProfile("email: contains line breaks or control characters")
    try:
        result = _validate_email(raw.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidProfile(f"email: {raw.strip()!r} is not a valid address ({exc})") from None
    # Domains are case-insensitive; local parts technically are not, but every real provider
    # treats them so, and lower-casing keeps one person from subscribing twice.
    return str(result.normalized).lower()


def validate_timezone(raw: str) -> str:
    name = (raw or "").strip()
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidProfile(
            f"timezone: {name!r} is not a known IANA time zone (e.g. Europe/Berlin, UTC)"
        ) from None
    if name not in available_timezones() and name != "UTC":
        raise InvalidProfile(f"timezone: {name!r} is not a known IANA time zone")
    return name


def _validate_keywords(field_name: str, raw: Any) -> list[str]:
    if isinstance(raw, str):
        raw = [part for part in re.split(r"[,\n]", raw) if part.strip()]
    if not isinstance(raw, list | tuple):
        raise InvalidProfile(f"{field_name}: expected a list of words or phrases")
    out: list[str] = []
    seen: set[str] = set()
    for item in raw:
        if not isinstance(item, str):
            raise InvalidProfile(f"{field_name}: {item!r} is not text")
        try:
            keyword = validate_keyword(item)
        except ValueError as exc:
            raise InvalidProfile(f"{field_name}: {exc}") from None
        if keyword.lower() not in seen:
            seen.add(keyword.lower())
            out.append(keyword)
    if len(out) > MAX_KEYWORDS:
        raise InvalidProfile(f"{field_name}: at most {MAX_KEYWORDS} entries, got {len(out)}")
    return out


def _int_in(field_name: str, raw: Any, low: int, high: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise InvalidProfile(f"{field_name}: expected a whole number from {low} to {high}")
    try:
        value = int(raw)
    except ValueError:
        raise InvalidProfile(f"{field_name}: expected a whole number, not {raw!r}") from None
    if not low <= value <= high:
        raise InvalidProfile(f"{field_name}: must be from {low} to {high}, not {value}")
    return value


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """A subscriber as the operator declares it; the DB row adds bookkeeping."""

    email: str
    keywords: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    max_items: int = 10
    timezone: str = "UTC"
    send_hour: int = 7
    frequency: str = Frequency.DAILY.value

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ProfileSpec:
        unknown = sorted(set(data) - PROFILE_KEYS)
        if unknown:
            raise InvalidProfile(
                f"unknown field(s): {', '.join(unknown)} "
                f"(allowed: {', '.join(sorted(PROFILE_KEYS - {'status'}))})"
            )
        if "email" not in data:
            raise InvalidProfile("email: missing")
        frequency = str(data.get("frequency", Frequency.DAILY.value)).lower()
        if frequency not in {f.value for f in Frequency}:
            raise InvalidProfile(f"frequency: must be daily or weekly, not {frequency!r}")
        spec = cls(
            email=validate_email(data["email"]),
            keywords=_validate_keywords("keywords", data.get("keywords", [])),
            exclude=_validate_keywords("exclude", data.get("exclude", [])),
            max_items=_int_in("max_items", data.get("max_items", 10), 1, MAX_ITEMS_LIMIT),
            timezone=validate_timezone(str(data.get("timezone", "UTC"))),
            send_hour=_int_in("send_hour", data.get("send_hour", 7), 0, 23),
            frequency=frequency,
        )
        if not spec.keywords:
            raise InvalidProfile("keywords: give at least one word or phrase to match papers")
        return spec

    @classmethod
    def from_subscriber(cls, sub: Subscriber) -> ProfileSpec:
        return cls(
            email=sub.email,
            keywords=list(sub.keywords),
            exclude=list(sub.exclude),
            max_items=sub.max_items,
            timezone=sub.timezone,
            send_hour=sub.send_hour,
            frequency=sub.frequency.value,
        )

    def to_toml(self, status: SubscriberStatus = SubscriberStatus.ACTIVE) -> str:
        data: dict[str, Any] = asdict(self)
        if status is not SubscriberStatus.ACTIVE:
            # Written only when it is not the default, so that a backup restores a paused or
            # unsubscribed reader as such, and hand-written files stay short.
            data["status"] = status.value
        return tomli_w.dumps(data)


def load_profile(path: Path) -> ProfileSpec:
    return load_profile_with_status(path)[0]


def load_profile_with_status(path: Path) -> tuple[ProfileSpec, SubscriberStatus]:
    """The profile and the status the file gives (active when it gives none)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidProfile(f"{path}: cannot read: {exc}") from None
    try:
        raw_status = str(data.get("status", SubscriberStatus.ACTIVE.value)).lower()
        if raw_status not in {s.value for s in SubscriberStatus}:
            allowed = ", ".join(s.value for s in SubscriberStatus)
            raise InvalidProfile(f"status: must be one of {allowed}, not {raw_status!r}")
        return ProfileSpec.from_mapping(data), SubscriberStatus(raw_status)
    except InvalidProfile as exc:
        raise InvalidProfile(f"{path}: {exc}") from None


def profile_filename(email: str) -> str:
    """A file name that is safe on every OS and unique per address: when characters had to be
    replaced, a short hash of the real address keeps o'brien@x and o_brien@x apart."""
    address = email.lower()
    safe = re.sub(r"[^a-z0-9._@+-]", "_", address)
    if safe != address:
        safe += "-" + hashlib.sha256(address.encode()).hexdigest()[:8]
    return safe + ".toml"


def find(session: Session, email: str) -> Subscriber | None:
    """The subscriber with this address, as typed (case and surrounding spaces aside)."""
    return session.scalar(select(Subscriber).where(Subscriber.email == email.strip().lower()))


def upsert(
    session: Session, spec: ProfileSpec, *, status: SubscriberStatus | None = None
) -> tuple[Subscriber, bool]:
    """Create or update by address; returns (subscriber, created). Never duplicates."""
    sub = find(session, spec.email)
    created = sub is None
    if sub is None:
        sub = Subscriber(email=spec.email, status=status or SubscriberStatus.ACTIVE)
        session.add(sub)
    elif status is not None:
        sub.status = status
    sub.keywords = list(spec.keywords)
    sub.exclude = list(spec.exclude)
    sub.max_items = spec.max_items
    sub.timezone = spec.timezone
    sub.send_hour = spec.send_hour
    sub.frequency = Frequency(spec.frequency)
    session.flush()
    return sub, created


def remove(session: Session, email: str) -> Subscriber | None:
    """Delete a subscriber by address, with their delivery history: the database cascades
    their deliveries, and their papers in those digests are deleted here (`DeliveryItem` has
    no foreign key to cascade from; see models). None if there is no such subscriber.

    The subscriber goes first: a `send` planning their digest at this moment holds a lock on
    their row until it commits, so deleting the row waits for that digest to be in the
    ledger, and the items deleted next include it. (Items first would miss it, and leave its
    items behind once the cascade took the delivery.)"""
    sub = find(session, email)
    if sub is not None:
        session.delete(sub)
        session.flush()
        session.execute(delete(DeliveryItem).where(DeliveryItem.subscriber_id == sub.id))
    return sub


@dataclass
class ImportReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def import_profiles(session: Session, paths: Iterable[Path]) -> ImportReport:
    """Imported subscribers are active (the operator vouches for them) unless the file says
    otherwise, as an export of a paused or unsubscribed reader does. A bad file is reported and
    skipped; the good ones still go in."""
    report = ImportReport()
    for path in paths:
        try:
            spec, status = load_profile_with_status(path)
        except InvalidProfile as exc:
            report.errors.append(str(exc))
            continue
        _, created = upsert(session, spec, status=status)
        (report.created if created else report.updated).append(spec.email)
    return report


def profile_paths(target: Path) -> list[Path]:
    if target.is_dir():
        return sorted(target.glob("*.toml"))
    return [target]


def export_profiles(session: Session, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for sub in session.scalars(select(Subscriber).order_by(Subscriber.email)):
        path = folder / profile_filename(sub.email)
        tmp = path.with_suffix(".toml.tmp")
        tmp.write_text(ProfileSpec.from_subscriber(sub).to_toml(sub.status), encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written
