"""Digests into email: Jinja2 templates to HTML and text, then one MIME message.

Templates are compiled once per `Renderer`; per-message work is filling in a small context.
An operator's own template folder (setting ``templates_dir``) is searched before the built-in
one, so overriding one file leaves the rest as shipped.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape

from newsletter.config import Settings
from newsletter.matching import highlight

BUILTIN_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
SUMMARY_LIMIT = 600
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


@dataclass(frozen=True, slots=True)
class DigestItem:
    title: str
    link: str | None
    summary: str
    truncated: bool
    title_parts: Sequence[tuple[str, bool]]
    summary_parts: Sequence[tuple[str, bool]]
    matched: Sequence[str]
    matched_where: str
    published: date | None
    authors: str
    source: str


@dataclass(frozen=True, slots=True)
class Digest:
    to: str
    period: str
    day: date
    items: Sequence[DigestItem]
    manage_url: str
    unsubscribe_url: str
    unsubscribe_mailto: str
    message_id: str
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Notice:
    """A one-off email (confirm your address, welcome, your manage link), rendered from
    ``email/<kind>.txt``, ``email/<kind>.html`` and ``email/<kind>_subject.txt``."""

    kind: str
    to: str
    context: Mapping[str, Any]
    message_id: str
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None


NOTICE_KINDS = ("confirm", "welcome", "manage_link")


def new_message_id(domain: str, kind: str) -> str:
    return f"<{kind}.{secrets.token_hex(10)}@{domain}>"


def shorten(text: str, limit: int = SUMMARY_LIMIT) -> tuple[str, bool]:
    """Cut at a sentence end if one is near the limit, else at a word; say whether we cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text, False
    head = text[:limit]
    ends = [m.start() for m in _SENTENCE_END.finditer(head)]
    if ends and ends[-1] > limit * 0.6:
        return head[: ends[-1]].rstrip(), True
    return head.rsplit(" ", 1)[0].rstrip(" ,;:-") + "…", True


def make_item(
    *,
    title: str,
    link: str | None,
    summary: str,
    hits: Sequence[Mapping[str, Any]],
    published: datetime | None,
    authors: Sequence[str],
    source: str,
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> DigestItem:
    """Turn a stored pick (entry + the reasons it matched) into what the templates show."""
    keywords = [str(h["keyword"]) for h in hits]
    where = []
    if any(h.get("title") for h in hits):
        where.append("title")
    if any(h.get("summary") for h in hits):
        where.append("summary")
    short, truncated = shorten(summary)
    return DigestItem(
        title=title,
        link=link,
        summary=short,
        truncated=truncated,
        title_parts=highlight(title, keywords, synonyms),
        summary_parts=highlight(short, keywords, synonyms),
        matched=keywords,
        matched_where=" and ".join(where),
        published=published.date() if published else None,
        authors=", ".join(authors),
        source=source,
    )


def _wrap(text: str, width: int = 72, indent: str = "") -> str:
    return textwrap.fill(
        text, width=width, initial_indent=indent, subsequent_indent=indent, break_long_words=False
    )


def domain_of(address: str) -> str:
    _, addr = parseaddr(address)
    return addr.rpartition("@")[2] or "localhost"


class Renderer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        folders = [Path(settings.templates_dir)] if settings.templates_dir else []
        folders.append(BUILTIN_TEMPLATES)
        self.env = Environment(
            loader=ChoiceLoader([FileSystemLoader(str(f)) for f in folders]),
            autoescape=select_autoescape(["html", "htm", "xml"], default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["wrap"] = _wrap
        self._html = self.env.get_template("email/digest.html")
        self._text = self.env.get_template("email/digest.txt")
        self._subject = self.env.get_template("email/digest_subject.txt")
        from_name, from_addr = parseaddr(settings.from_addr)
        if not from_addr:
            raise ValueError(f"from_addr {settings.from_addr!r} has no email address")
        self.sender = Address(display_name=from_name, addr_spec=from_addr)
        self.domain = domain_of(from_addr)

    def context(self, digest: Digest) -> dict[str, Any]:
        return {
            "digest": digest,
            "items": digest.items,
            "count": len(digest.items),
            "day": digest.day,
            "base_url": self.settings.base_url.rstrip("/"),
            "contact": self.settings.reply_to or self.sender.addr_spec,
            **digest.extra,
        }

    def subject(self, digest: Digest) -> str:
        # Subjects are headers: no line breaks may survive, whatever a template does.
        return " ".join(self._subject.render(self.context(digest)).split())

    def bodies(self, digest: Digest) -> tuple[str, str]:
        ctx = self.context(digest)
        return self._text.render(ctx), self._html.render(ctx)

    def unsubscribe_mailto(self, token: str) -> str:
        return f"mailto:unsubscribe@{self.domain}?subject={quote('unsubscribe ' + token)}"

    def message(self, digest: Digest, *, now: datetime) -> EmailMessage:
        """A multipart/alternative message, text first and HTML last (clients show the last
        part they can), with the headers bulk senders are required to carry."""
        text, html = self.bodies(digest)
        return self._assemble(
            to=digest.to,
            subject=self.subject(digest),
            message_id=digest.message_id,
            now=now,
            text=text,
            html=html,
            unsubscribe=(digest.unsubscribe_url, digest.unsubscribe_mailto),
        )

    def notice_message(self, notice: Notice, *, now: datetime) -> EmailMessage:
        ctx = {
            "base_url": self.settings.base_url.rstrip("/"),
            "contact": self.settings.reply_to or self.sender.addr_spec,
            "to": notice.to,
            **notice.context,
        }
        subject = " ".join(
            self.env.get_template(f"email/{notice.kind}_subject.txt").render(ctx).split()
        )
        text = self.env.get_template(f"email/{notice.kind}.txt").render(ctx)
        html = self.env.get_template(f"email/{notice.kind}.html").render(ctx)
        unsubscribe = None
        if notice.unsubscribe_url and notice.unsubscribe_mailto:
            unsubscribe = (notice.unsubscribe_url, notice.unsubscribe_mailto)
        return self._assemble(
            to=notice.to,
            subject=subject,
            message_id=notice.message_id,
            now=now,
            text=text,
            html=html,
            unsubscribe=unsubscribe,
        )

    def _assemble(
        self,
        *,
        to: str,
        subject: str,
        message_id: str,
        now: datetime,
        text: str,
        html: str,
        unsubscribe: tuple[str, str] | None,
    ) -> EmailMessage:
        """The one place headers are set, so digests and notices carry the same ones."""
        msg = EmailMessage(policy=SMTP)
        msg["From"] = self.sender
        msg["To"] = to
        if self.settings.reply_to:
            msg["Reply-To"] = self.settings.reply_to
        msg["Subject"] = subject
        msg["Date"] = format_datetime(now)
        msg["Message-ID"] = message_id
        msg["List-Id"] = self.settings.list_id
        if unsubscribe is not None:
            msg["List-Unsubscribe"] = f"<{unsubscribe[0]}>, <{unsubscribe[1]}>"
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Auto-Response-Suppress"] = "All"
        msg.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
        msg.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
        return msg

    def render_bytes(self, digest: Digest, *, now: datetime) -> bytes:
        return self.message(digest, now=now).as_bytes(policy=SMTP)
