"""One-off emails to one person: confirm your address, welcome, here is your settings link.

They are sent while someone waits on a web page, outside the digest ledger: there is nothing
to retry later (the person can ask again), so a notice is built from plain values, sent on its
own SMTP connection and either accepted or reported. Links are made by the same `Composer` as
the digests', so every email carries the same kind of manage and unsubscribe link.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from email.utils import parseaddr

from starlette.concurrency import run_in_threadpool

from newsletter import mailer
from newsletter.compose import Composer
from newsletter.config import Settings
from newsletter.models import Subscriber
from newsletter.render import Notice, Renderer, new_message_id
from newsletter.tokens import Purpose, Signer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Recipient:
    """What a notice needs to know about a subscriber, copied out of the ORM row so that a
    notice can be sent after the database session that loaded it has closed."""

    id: int
    email: str
    keywords: tuple[str, ...]
    exclude: tuple[str, ...]
    send_hour: int
    timezone: str

    @classmethod
    def of(cls, sub: Subscriber) -> Recipient:
        return cls(
            sub.id,
            sub.email,
            tuple(sub.keywords),
            tuple(sub.exclude),
            sub.send_hour,
            sub.timezone,
        )


@dataclass(frozen=True, slots=True)
class Outgoing:
    kind: str
    to: str
    data: bytes


class Notices:
    def __init__(self, settings: Settings, secret_key: str) -> None:
        self.settings = settings
        self.renderer = Renderer(settings)
        self.signer = Signer(secret_key)
        self.composer = Composer(self.renderer, self.signer)
        self.base_url = settings.base_url.rstrip("/")
        # Notices go out with the plain From address as envelope sender: they are answers to
        # a person's own request, not bulk mail that needs per-delivery bounce tracking.
        self.envelope_from = parseaddr(settings.from_addr)[1]

    def confirm_url(self, subscriber_id: int, email: str) -> str:
        token = self.signer.make(Purpose.CONFIRM, subscriber_id, email)
        return f"{self.base_url}/confirm/{token}"

    def links(self, subscriber_id: int, email: str) -> dict[str, str]:
        """manage_url, unsubscribe_url and unsubscribe_mailto, exactly as digests make them."""
        return self.composer.links(subscriber_id, email)

    def _build(
        self,
        kind: str,
        to: str,
        context: dict[str, object],
        now: datetime,
        unsubscribe: tuple[str, str] | None = None,
    ) -> Outgoing:
        notice = Notice(
            kind,
            to,
            context,
            new_message_id(self.renderer.domain, kind),
            unsubscribe_url=unsubscribe[0] if unsubscribe else None,
            unsubscribe_mailto=unsubscribe[1] if unsubscribe else None,
        )
        return Outgoing(kind, to, self.renderer.notice_bytes(notice, now=now))

    def confirm(self, who: Recipient, now: datetime) -> Outgoing:
        context: dict[str, object] = {
            "keywords": list(who.keywords),
            "confirm_url": self.confirm_url(who.id, who.email),
        }
        return self._build("confirm", who.email, context, now)

    def welcome(self, who: Recipient, now: datetime) -> Outgoing:
        links = self.links(who.id, who.email)
        context: dict[str, object] = {
            "keywords": list(who.keywords),
            "exclude": list(who.exclude),
            "send_hour": who.send_hour,
            "timezone": who.timezone,
            "manage_url": links["manage_url"],
            "unsubscribe_url": links["unsubscribe_url"],
        }
        unsubscribe = (links["unsubscribe_url"], links["unsubscribe_mailto"])
        return self._build("welcome", who.email, context, now, unsubscribe)

    def manage_link(self, who: Recipient, now: datetime) -> Outgoing:
        links = self.links(who.id, who.email)
        unsubscribe = (links["unsubscribe_url"], links["unsubscribe_mailto"])
        return self._build(
            "manage_link", who.email, {"manage_url": links["manage_url"]}, now, unsubscribe
        )

    def send(self, outgoing: Outgoing) -> mailer.Result:
        """Blocking; logs the outcome without the message (it holds signed links)."""
        result = mailer.send_one(self.settings, self.envelope_from, outgoing.to, outgoing.data)
        if result.outcome is mailer.Outcome.SENT:
            log.info("sent %s notice to %s", outgoing.kind, outgoing.to)
        else:
            log.warning(
                "could not send %s notice to %s: %s", outgoing.kind, outgoing.to, result.describe()
            )
        return result

    async def send_async(self, outgoing: Outgoing) -> mailer.Result:
        """SMTP is blocking and may take seconds; a thread keeps the event loop serving."""
        return await run_in_threadpool(self.send, outgoing)
