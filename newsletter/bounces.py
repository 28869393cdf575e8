"""Inbound bounces and complaints: `newsletter bounces` receives them over SMTP, ties each to
its delivery by the VERP address it was sent to, and suppresses addresses that keep failing.

- hard bounce (a permanent 5.x.x status, e.g. 5.1.1 user unknown): the address is suppressed
  at once (status `bounced`, with the reason);
- soft bounce (4.x.x, or 5.2.2 mailbox full): suppressed after `soft_bounce_limit` of them
  within `soft_bounce_window_days`;
- complaint (an ARF feedback report: the reader pressed "this is spam"): unsubscribed.

Parsing is pure (bytes → `BounceReport`); the aiosmtpd handler and the database update are the
I/O around it. A bounce whose VERP token is missing or forged is recorded in the log and
changes nothing: otherwise anyone could unsubscribe anyone by mailing us a fake DSN.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any

import click
from sqlalchemy import func, select

from newsletter.app import App
from newsletter.db import transaction
from newsletter.envelope import parse_verp
from newsletter.models import (
    Bounce,
    BounceKind,
    Delivery,
    Subscriber,
    SubscriberStatus,
    utcnow,
)

log = logging.getLogger(__name__)

_STATUS_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_SMTP_CODE_RE = re.compile(r"(?m)^\s*([45]\d\d)[ -]")
# Mailbox full is "permanent" by its code but passes with time: treat it as soft.
_SOFT_PERMANENT = {"5.2.2"}


@dataclass(frozen=True, slots=True)
class BounceReport:
    kind: BounceKind
    status: str | None  # e.g. "5.1.1"
    diagnostic: str


def _text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode(part.get_content_charset() or "utf-8", "replace")
    if isinstance(payload, str):
        return payload
    return ""


def _delivery_status_fields(part: Message) -> list[Message]:
    """The per-recipient field groups of a message/delivery-status part."""
    payload = part.get_payload()
    if isinstance(payload, list):
        groups: list[Message] = [p for p in payload if isinstance(p, Message)]
        return groups[1:] or groups
    blocks = [b for b in re.split(r"\r?\n\r?\n", _text(part)) if b.strip()]
    return [email.message_from_string(b + "\n") for b in blocks[1:]]


def classify(raw: bytes) -> BounceReport | None:
    """What a bounce or complaint says, or None when it is neither (an auto-reply, say)."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    ctype = msg.get_content_type()
    param = msg.get_param("report-type") if ctype == "multipart/report" else None
    report_type = param.lower() if isinstance(param, str) else ""
    if report_type == "feedback-report" or any(
        p.get_content_type() == "message/feedback-report" for p in msg.walk()
    ):
        return BounceReport(BounceKind.COMPLAINT, None, "the reader reported the digest as spam")
    status_parts = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    for part in status_parts:
        for fields in _delivery_status_fields(part):
            action = str(fields.get("Action", "")).strip().lower()
            status = str(fields.get("Status", "")).strip()
            diagnostic = " ".join(str(fields.get("Diagnostic-Code", "")).split())
            if action in {"delayed", "relayed", "delivered", "expanded"}:
                continue
            match = _STATUS_RE.search(status)
            if match:
                return _report(match.group(0), diagnostic or status)
    if status_parts:
        return None  # a DSN that only reports delays or successes: nothing failed
    # Plain-text bounces (Postfix, Exim, many hosted MTAs): look for an enhanced status code
    # or an SMTP reply code in the human-readable text.
    subject = str(msg.get("Subject", "")).lower()
    body = "\n".join(_text(p) for p in msg.walk() if p.get_content_maintype() == "text")[:20000]
    looks_like_bounce = any(
        w in subject
        for w in ("undeliver", "delivery status", "returned mail", "failure", "not delivered")
    ) or str(msg.get("From", "")).lower().startswith(("mailer-daemon", "postmaster"))
    if not looks_like_bounce:
        return None
    match = _STATUS_RE.search(body)
    if match and match.group(1) in "45":
        return _report(match.group(0), _first_line_with(body, match.group(0)))
    code = _SMTP_CODE_RE.search(body)
    if code:
        status = f"{code.group(1)[0]}.0.0"
        return _report(status, _first_line_with(body, code.group(1)))
    return BounceReport(BounceKind.SOFT, None, "a bounce without a status code")


def _report(status: str, diagnostic: str) -> BounceReport:
    kind = (
        BounceKind.HARD
        if status.startswith("5") and status not in _SOFT_PERMANENT
        else BounceKind.SOFT
    )
    return BounceReport(kind, status, diagnostic[:500])


def _first_line_with(text: str, needle: str) -> str:
    for line in text.splitlines():
        if needle in line:
            return " ".join(line.split())
    return needle


def record(
    app: App, recipients: Iterable[str], report: BounceReport, now: datetime | None = None
) -> list[str]:
    """Store the bounce against every delivery its VERP recipients name, and suppress as the
    rules say. Returns what happened, one line per recipient, for the log."""
    now = now or utcnow()
    settings = app.settings
    outcomes = []
    for rcpt in recipients:
        delivery_id = parse_verp(app.secret_key, rcpt)
        if delivery_id is None:
            outcomes.append(f"{rcpt}: not one of our VERP addresses, or forged; ignored")
            continue
        with transaction(app.sessions) as session:
            delivery = session.get(Delivery, delivery_id)
            if delivery is None:
                outcomes.append(f"{rcpt}: delivery {delivery_id} no longer exists; ignored")
                continue
            sub = session.get(Subscriber, delivery.subscriber_id)
            assert sub is not None
            session.add(
                Bounce(
                    subscriber_id=sub.id,
                    delivery_id=delivery.id,
                    kind=report.kind,
                    status_code=report.status,
                    diagnostic=report.diagnostic,
                    received_at=now,
                )
            )
            session.flush()
            when = f"{now:%Y-%m-%d %H:%M} UTC"
            if report.kind is BounceKind.COMPLAINT:
                if sub.status is not SubscriberStatus.UNSUBSCRIBED:
                    sub.status = SubscriberStatus.UNSUBSCRIBED
                    sub.status_reason = f"unsubscribed {when}: marked the digest as spam"
                outcomes.append(f"{sub.email}: complaint, unsubscribed")
            elif report.kind is BounceKind.HARD:
                sub.failure_count += 1
                if sub.status is SubscriberStatus.ACTIVE:
                    sub.status = SubscriberStatus.BOUNCED
                    sub.status_reason = (
                        f"suppressed {when} after a hard bounce: {report.status} "
                        f"{report.diagnostic}"
                    )
                outcomes.append(f"{sub.email}: hard bounce {report.status}, suppressed")
            else:
                since = now - timedelta(days=settings.soft_bounce_window_days)
                soft = (
                    session.scalar(
                        select(func.count()).where(
                            Bounce.subscriber_id == sub.id,
                            Bounce.kind == BounceKind.SOFT,
                            Bounce.received_at >= since,
                        )
                    )
                    or 0
                )
                if soft >= settings.soft_bounce_limit and sub.status is SubscriberStatus.ACTIVE:
                    sub.status = SubscriberStatus.BOUNCED
                    sub.status_reason = (
                        f"suppressed {when} after {soft} soft bounces in "
                        f"{settings.soft_bounce_window_days} days; last: {report.status} "
                        f"{report.diagnostic}"
                    )
                    outcomes.append(f"{sub.email}: soft bounce {soft}, suppressed")
                else:
                    outcomes.append(
                        f"{sub.email}: soft bounce {soft} of {settings.soft_bounce_limit}"
                    )
    for line in outcomes:
        log.info("bounce: %s", line)
    return outcomes


class BounceHandler:
    """aiosmtpd handler: accepts everything addressed to our domain and files it."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.processed = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        data = raw if isinstance(raw, bytes) else str(raw).encode()
        report = classify(data)
        if report is None:
            log.info("inbound mail to %s is not a bounce; dropped", envelope.rcpt_tos)
        else:
            await asyncio.get_running_loop().run_in_executor(
                None, record, self.app, list(envelope.rcpt_tos), report
            )
        self.processed += 1
        return "250 OK"


def start_receiver(app: App, host: str, port: int) -> Any:
    """A running aiosmtpd server (stop it with `.stop()`); `.port` is the bound port."""
    from newsletter.sink import BackgroundSMTPServer

    server = BackgroundSMTPServer(BounceHandler(app), host, port)
    server.start()
    return server


@click.command("bounces")
@click.option("--host", help="Address to listen on (default: bounce_host, 127.0.0.1).")
@click.option("--port", type=int, help="Port (default: bounce_port, 2525).")
@click.option("--list", "list_only", is_flag=True, help="Show recent bounces and exit.")
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Process saved bounce messages (with --rcpt) instead of listening.",
)
@click.option("--rcpt", help="The VERP address a --file bounce was sent to.")
@click.pass_context
def bounces_command(
    ctx: click.Context,
    host: str | None,
    port: int | None,
    list_only: bool,
    files: tuple[Path, ...],
    rcpt: str | None,
) -> None:
    """Receive bounces and complaints by SMTP and suppress failing addresses.

    Point the MX (or a transport map) for the bounce domain at this. Every digest is sent with
    a per-delivery envelope sender bounces+TOKEN@domain, so each bounce finds its delivery."""
    app: App = ctx.obj
    app.check_ready()
    if list_only:
        with app.session() as session:
            rows = session.execute(
                select(Bounce, Subscriber.email)
                .join(Subscriber, Subscriber.id == Bounce.subscriber_id)
                .order_by(Bounce.received_at.desc())
                .limit(50)
            ).all()
        for bounce, address in rows:
            click.echo(
                f"{bounce.received_at:%Y-%m-%d %H:%M}  {bounce.kind.value:9}  "
                f"{bounce.status_code or '-':6} {address}  {bounce.diagnostic or ''}"
            )
        click.echo(
            f"{len(rows)} recent bounce(s). Lift a suppression with "
            "`newsletter subscribers edit EMAIL --status active`."
        )
        return
    if files:
        if not rcpt:
            raise click.UsageError("--file needs --rcpt (the VERP address it came to)")
        for path in files:
            report = classify(path.read_bytes())
            if report is None:
                click.echo(f"{path}: not a bounce")
                continue
            for line in record(app, [rcpt], report):
                click.echo(f"{path}: {line}")
        return
    settings = app.settings
    server = start_receiver(app, host or settings.bounce_host, port or settings.bounce_port)
    click.echo(f"Receiving bounces on {host or settings.bounce_host}:{server.port} (Ctrl-C stops)")
    import signal
    import threading

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
