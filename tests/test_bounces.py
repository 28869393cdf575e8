"""Bounces end to end: a digest goes out with a VERP envelope sender, the receiving server
accepts it and later returns a DSN to that address, our bounce receiver ties it to the delivery
and suppresses the address, and the next day's send leaves that reader out."""

from __future__ import annotations

import smtplib
import time
from datetime import timedelta

import pytest
from conftest import RSS_FIXTURE, make_settings
from sqlalchemy import func, select

from newsletter import bounces, db, digests, ingest, subscribers
from newsletter.app import App
from newsletter.cli import run_send
from newsletter.models import Bounce, BounceKind, Delivery, Subscriber, SubscriberStatus, utcnow
from newsletter.sink import Sink


def dsn(verp: str, rcpt: str, status: str, action: str = "failed") -> bytes:
    """An RFC 3464 delivery status notification, as an MTA sends it back to the envelope
    sender."""
    return (
        f"From: MAILER-DAEMON@mx.example.net\r\nTo: {verp}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} <{rcpt}>: Recipient address rejected: "
        "User unknown\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\nSubject: 3 new papers for you\r\n"
        "--B--\r\n"
    ).encode()


ARF = (
    b"From: fbl@isp.example\r\nTo: bounces@example.org\r\nSubject: complaint\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/report; report-type=feedback-report; boundary="F"\r\n\r\n'
    b"--F\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n"
    b"--F\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
    b"User-Agent: isp/1.0\r\nVersion: 1\r\n\r\n--F--\r\n"
)
POSTFIX_TEXT = (
    b"From: MAILER-DAEMON (Mail Delivery System)\r\nSubject: Undelivered Mail Returned to "
    b"Sender\r\n\r\nI'm sorry to have to inform you that your message could not\r\nbe delivered"
    b" to one or more recipients.\r\n\r\n<ada@example.org>: host mx.example.net said: 550 5.1.1"
    b" <ada@example.org>: Recipient address rejected: User unknown\r\n"
)
AUTO_REPLY = b"From: ada@example.org\r\nSubject: Out of office\r\n\r\nI am away until Monday.\r\n"


@pytest.mark.parametrize(
    ("raw", "kind", "status"),
    [
        (dsn("b@x", "ada@example.org", "5.1.1"), BounceKind.HARD, "5.1.1"),
        (dsn("b@x", "ada@example.org", "5.2.2"), BounceKind.SOFT, "5.2.2"),
        (dsn("b@x", "ada@example.org", "4.4.7"), BounceKind.SOFT, "4.4.7"),
        (ARF, BounceKind.COMPLAINT, None),
        (POSTFIX_TEXT, BounceKind.HARD, "5.1.1"),
    ],
)
def test_classify(raw: bytes, kind: BounceKind, status: str | None) -> None:
    report = bounces.classify(raw)
    assert report is not None and report.kind is kind and report.status == status


def test_not_bounces() -> None:
    assert bounces.classify(AUTO_REPLY) is None
    assert bounces.classify(dsn("b@x", "a@x", "4.4.7", action="delayed")) is None


def _deliver(port: int, verp: str, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("", [verp], raw)


def _status(app: App, address: str) -> SubscriberStatus:
    with app.session() as session:
        status = session.scalar(select(Subscriber.status).where(Subscriber.email == address))
    assert status is not None
    return status


def _wait_for(app: App, address: str, status: SubscriberStatus) -> None:
    deadline = time.monotonic() + 10
    while _status(app, address) is not status and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _status(app, address) is status


def test_dsn_suppresses_and_the_next_day_skips(db_url: str, sink: Sink) -> None:
    app = App(make_settings(db_url, sink.port, soft_bounce_limit=2))
    app.init()
    with db.transaction(app.sessions) as session:
        ingest.add_feed(session, str(RSS_FIXTURE))
        for address in ("ada@example.org", "bob@example.org", "cy@example.org"):
            spec = subscribers.ProfileSpec.from_mapping(
                {"email": address, "keywords": ["diffusion"]}
            )
            subscribers.upsert(session, spec)
    ingest.fetch_all(app)
    assert run_send(app) == 0
    verp = {m.rcpt_tos[0]: m.mail_from for m in sink.messages()}
    assert all(v.startswith("bounces+") for v in verp.values()), "VERP envelope senders"

    receiver = bounces.start_receiver(app, "127.0.0.1", 0)
    try:
        _deliver(
            receiver.port,
            verp["ada@example.org"],
            dsn(verp["ada@example.org"], "ada@example.org", "5.1.1"),
        )
        _wait_for(app, "ada@example.org", SubscriberStatus.BOUNCED)
        _deliver(receiver.port, verp["cy@example.org"], ARF)
        _wait_for(app, "cy@example.org", SubscriberStatus.UNSUBSCRIBED)
        # A forged token changes nothing.
        forged = verp["bob@example.org"].replace("bounces+", "bounces+1")
        _deliver(receiver.port, forged, dsn(forged, "bob@example.org", "5.1.1"))
        # One soft bounce of two allowed: still active.
        _deliver(
            receiver.port,
            verp["bob@example.org"],
            dsn(verp["bob@example.org"], "bob@example.org", "4.2.2"),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with app.session() as session:
                if session.scalar(select(func.count()).select_from(Bounce)) == 3:
                    break
            time.sleep(0.05)
    finally:
        receiver.stop()
    assert _status(app, "bob@example.org") is SubscriberStatus.ACTIVE
    with app.session() as session:
        ada = session.scalar(select(Subscriber).where(Subscriber.email == "ada@example.org"))
        assert ada is not None and ada.status_reason and "5.1.1" in ada.status_reason
        assert session.scalar(select(func.count()).select_from(Bounce)) == 3

    # The next day: only bob is planned.
    with db.transaction(app.sessions) as session:
        session.execute(Delivery.__table__.update().values(period="2000-01-01"))
    report = digests.plan_period(
        app.sessions,
        utcnow() + timedelta(days=1),
        window=timedelta(days=36500),
        domain="example.org",
    )
    with app.session() as session:
        planned = session.scalars(
            select(Subscriber.email).join(Delivery).where(Delivery.period != "2000-01-01")
        ).all()
    assert report.subscribers == 1 and list(planned) in ([], ["bob@example.org"])
