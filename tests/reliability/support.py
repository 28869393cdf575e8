"""Shared pieces of the reliability tests: a counting SMTP server, fast bulk set-up, and the
environment a `newsletter` subprocess needs."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import insert

from newsletter.app import App
from newsletter.models import Frequency, Subscriber, SubscriberStatus, utcnow
from newsletter.sink import BackgroundSMTPServer

SECRET = "test-secret-key-not-for-production"
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(.+?)\r?$", re.MULTILINE | re.IGNORECASE)


class _CountingHandler:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.counts: Counter[str] = Counter()
        self.message_ids: defaultdict[str, list[bytes]] = defaultdict(list)
        self.total = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content
        found = _MESSAGE_ID.search(raw[: raw.find(b"\r\n\r\n")])
        with self.cond:
            for rcpt in envelope.rcpt_tos:
                self.counts[rcpt.casefold()] += 1
                self.message_ids[rcpt.casefold()].append(found.group(1) if found else b"")
            self.total += 1
            self.cond.notify_all()
        return "250 2.0.0 OK"


class CountingSMTPServer(BackgroundSMTPServer):
    """Accepts everything and counts receipts per recipient, without keeping bodies, so 5,000
    messages cost nothing to tally; `wait_for` blocks on a condition, not a poll."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = _CountingHandler()
        super().__init__(self.handler, host, port)

    @property
    def total(self) -> int:
        with self.handler.cond:
            return self.handler.total

    def counts(self) -> Counter[str]:
        with self.handler.cond:
            return Counter(self.handler.counts)

    def message_ids(self) -> dict[str, list[bytes]]:
        with self.handler.cond:
            return {k: list(v) for k, v in self.handler.message_ids.items()}

    def wait_for(self, predicate: Callable[[int], bool], timeout: float) -> bool:
        """Wait until predicate(total accepted) holds, or timeout; wakes on every message."""
        with self.handler.cond:
            return self.handler.cond.wait_for(lambda: predicate(self.handler.total), timeout)

    def barrier(self) -> None:
        """One full SMTP round trip: the server loop has handled what was already buffered
        from connections that a killed client left behind."""
        with smtplib.SMTP(self.host, self.port, timeout=5) as smtp:
            smtp.noop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bulk_subscribers(
    app: App,
    emails: Iterable[str],
    keywords_for: Callable[[int, str], list[str]],
    *,
    status: SubscriberStatus = SubscriberStatus.ACTIVE,
    max_items: int = 10,
) -> int:
    """One executemany in one transaction: 5,000 subscribers in well under a second."""
    now = utcnow()
    rows = [
        {
            "email": email,
            "status": status,
            "keywords": keywords_for(i, email),
            "exclude": [],
            "max_items": max_items,
            "timezone": "UTC",
            "send_hour": 7,
            "frequency": Frequency.DAILY,
            "failure_count": 0,
            "created_at": now,
            "updated_at": now,
        }
        for i, email in enumerate(emails)
    ]
    with app.sessions() as session, session.begin():
        session.execute(insert(Subscriber), rows)
    return len(rows)


def cli_env(db_url: str, smtp_port: int, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "NEWSLETTER_DATABASE_URL": db_url,
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(smtp_port),
        "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_ENTRY_WINDOW_DAYS": "36500",
        "NEWSLETTER_FROM": "Paper Digest <digest@example.org>",
        "NEWSLETTER_BASE_URL": "https://digest.example.org",
    }
    env.pop("NEWSLETTER_CONFIG", None)
    env.update(extra)
    return env
