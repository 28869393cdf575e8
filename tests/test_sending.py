"""Sending against real SMTP servers: the sink, and a misbehaving server that refuses,
defers, drops the connection mid-DATA or is not there at all. The ledger must say what
happened to each delivery, and nobody may get a digest twice."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import RSS_FIXTURE, make_settings
from sqlalchemy import select, update

from newsletter import db, digests, ingest, subscribers
from newsletter.app import App
from newsletter.cli import run_send
from newsletter.models import (
    Delivery,
    DeliveryItem,
    DeliveryStatus,
    Subscriber,
    SubscriberStatus,
    utcnow,
)
from newsletter.sending import Sender
from newsletter.sink import Sink
from newsletter.testsmtp import FaultySMTPServer, Rule

PROFILES = {
    "ada@example.org": ["diffusion models"],
    "bob@example.org": ["equivariant"],
    "cy@example.org": ["quantum optimization"],
    "dee@example.org": ["Schrödinger bridge"],
}


def _prepare(
    settings_db: str, port: int, emails: dict[str, list[str]] = PROFILES, **kw: object
) -> App:
    app = App(make_settings(settings_db, port, **kw))  # type: ignore[arg-type]
    app.init()
    with db.transaction(app.sessions) as session:
        ingest.add_feed(session, str(RSS_FIXTURE))
        for email, keywords in emails.items():
            spec = subscribers.ProfileSpec.from_mapping({"email": email, "keywords": keywords})
            subscribers.upsert(session, spec)
    ingest.fetch_all(app)
    return app


def _plan(app: App) -> None:
    digests.plan_period(app.sessions, utcnow(), window=timedelta(days=36500), domain="example.org")


def _statuses(app: App) -> dict[str, tuple[DeliveryStatus, int, str | None]]:
    with app.session() as session:
        rows = session.execute(
            select(Subscriber.email, Delivery.status, Delivery.attempts, Delivery.smtp_reply).join(
                Subscriber
            )
        )
        return {email: (status, attempts, reply) for email, status, attempts, reply in rows}


def test_send_once_then_nothing(db_url: str, sink: Sink) -> None:
    app = _prepare(db_url, sink.port)
    assert run_send(app) == 0
    received = sorted(r for m in sink.messages() for r in m.rcpt_tos)
    assert received == sorted(PROFILES)
    statuses = _statuses(app)
    assert all(s == DeliveryStatus.SENT for s, _, _ in statuses.values())
    assert all(reply and reply.startswith("250") for _, _, reply in statuses.values()), (
        "the server's 250 reply is kept in the ledger"
    )
    assert run_send(app) == 0
    assert len(sink.messages()) == len(PROFILES), "a second run sends nothing"
    with app.session() as session:
        items = session.scalars(select(DeliveryItem)).all()
        assert items and all(item.hits for item in items), "each pick keeps why it matched"


def test_no_paper_reaches_the_same_person_twice(db_url: str, sink: Sink) -> None:
    app = _prepare(db_url, sink.port, {"ada@example.org": ["diffusion"]})
    assert run_send(app) == 0
    # A new period: the same papers are still recent, but ada already had them.
    with db.transaction(app.sessions) as session:
        session.execute(update(Delivery).values(period="2000-01-01"))
    assert run_send(app) == 0
    assert len(sink.messages()) == 1, "no new papers: no second (empty or repeated) email"


@pytest.fixture
def faulty() -> FaultySMTPServer:
    server = FaultySMTPServer(
        rules={
            "ada@example.org": Rule("reject_rcpt", code=550),
            "bob@example.org": Rule("tempfail_data", code=451, times=2),
            "cy@example.org": Rule("drop_in_data", times=1),
            "dee@example.org": Rule("tempfail_data", code=421, times=1),
        }
    )
    server.start()
    yield server
    server.stop()


def test_misbehaving_server(db_url: str, faulty: FaultySMTPServer) -> None:
    app = _prepare(db_url, faulty.port)
    assert run_send(app) == 0
    statuses = _statuses(app)

    ada_status, ada_attempts, ada_reply = statuses["ada@example.org"]
    assert ada_status == DeliveryStatus.FAILED and ada_attempts == 1, "550 is never retried"
    assert ada_reply and ada_reply.startswith("550")
    with app.session() as session:
        ada = session.scalar(select(Subscriber).where(Subscriber.email == "ada@example.org"))
        assert ada is not None and ada.status == SubscriberStatus.BOUNCED
        assert ada.status_reason and "550" in ada.status_reason

    assert statuses["bob@example.org"][:2] == (DeliveryStatus.SENT, 3), "451 twice, then sent"
    assert statuses["cy@example.org"][:2] == (DeliveryStatus.SENT, 2), "dropped once, then sent"
    assert statuses["dee@example.org"][:2] == (DeliveryStatus.SENT, 2), "421 once, then sent"
    for good in ("bob@example.org", "cy@example.org", "dee@example.org"):
        assert faulty.accepted_for(good) == 1, f"{good} delivered exactly once"
    assert faulty.accepted_for("ada@example.org") == 0

    assert run_send(app) == 0
    assert sum(faulty.accepted_for(e) for e in PROFILES) == 3, "a rerun sends nothing more"


def test_gives_up_after_max_attempts(sqlite_url: str) -> None:
    with FaultySMTPServer(rules={"ada@example.org": Rule("tempfail_data", code=451)}) as server:
        app = _prepare(sqlite_url, server.port, {"ada@example.org": ["diffusion"]}, max_attempts=3)
        assert run_send(app) == 0
        status, attempts, _ = _statuses(app)["ada@example.org"]
    assert (status, attempts) == (DeliveryStatus.FAILED, 3)
    with app.session() as session:
        error = session.scalar(select(Delivery.error))
        sub = session.scalar(select(Subscriber))
    assert error and error.startswith("gave up after 3 attempts: 451")
    assert sub is not None and sub.status == SubscriberStatus.ACTIVE, "4xx never suppresses"


def test_slow_server_times_out_and_is_retried(sqlite_url: str) -> None:
    rules = {"ada@example.org": Rule("slow", delay=1.5, times=1)}
    with FaultySMTPServer(rules=rules) as server:
        app = _prepare(
            sqlite_url, server.port, {"ada@example.org": ["diffusion"]}, smtp_timeout=0.5
        )
        assert run_send(app) == 0
        time.sleep(1.6)  # let the slow transaction finish on the server side
        status, attempts, _ = _statuses(app)["ada@example.org"]
        assert status == DeliveryStatus.SENT and attempts == 2
        # The slow first transaction may have completed late on the server: at most one extra
        # copy, and that copy is the one in flight when we timed out.
        assert 1 <= server.accepted_for("ada@example.org") <= 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_down_at_start_loses_nothing(db_url: str, tmp_path: Path) -> None:
    port = _free_port()
    app = _prepare(db_url, port, smtp_unreachable_patience=1.0)
    _plan(app)
    report = Sender(app).run()
    assert report.aborted and "cannot reach the SMTP server" in report.aborted
    assert report.sent == 0
    statuses = _statuses(app)
    assert len(statuses) == len(PROFILES)
    assert all(s == (DeliveryStatus.PENDING, 0, None) for s in statuses.values()), (
        "rows are handed back untouched, no attempt counted"
    )
    with Sink(tmp_path / "late-sink", "127.0.0.1", port) as late:
        assert run_send(app) == 0
        assert sorted(r for m in late.messages() for r in m.rcpt_tos) == sorted(PROFILES)


def test_rows_of_a_dead_worker_are_taken_over(db_url: str, sink: Sink) -> None:
    app = _prepare(db_url, sink.port)
    _plan(app)
    host = socket.gethostname()
    future = utcnow() + timedelta(hours=1)
    with db.transaction(app.sessions) as session:
        ids = list(session.scalars(select(Delivery.id).order_by(Delivery.id)))
        # a crashed process on this host, a live worker elsewhere, an expired lease
        session.execute(
            update(Delivery)
            .where(Delivery.id == ids[0])
            .values(
                status=DeliveryStatus.SENDING, claimed_by=f"{host}:999999:1", claimed_until=future
            )
        )
        session.execute(
            update(Delivery)
            .where(Delivery.id == ids[1])
            .values(status=DeliveryStatus.SENDING, claimed_by="elsewhere:1:1", claimed_until=future)
        )
        session.execute(
            update(Delivery)
            .where(Delivery.id == ids[2])
            .values(
                status=DeliveryStatus.SENDING,
                claimed_by="elsewhere:2:2",
                claimed_until=utcnow() - timedelta(seconds=1),
            )
        )
    report = Sender(app).run()
    assert report.sent == len(ids) - 1, "the live worker's row is left alone"
    with app.session() as session:
        left = session.get(Delivery, ids[1])
        assert left is not None and left.status == DeliveryStatus.SENDING


def test_sigkill_mid_send_loses_nothing(tmp_path: Path, sqlite_url: str) -> None:
    """Kill `newsletter send` while it is sending, restart it: everyone gets their digest,
    and resends are at most the messages in flight (one per connection)."""
    emails = {f"reader{i:03d}@example.org": ["diffusion"] for i in range(60)}
    rules = {e: Rule("slow", delay=0.05) for e in emails}
    with FaultySMTPServer(rules=rules) as server:
        app = _prepare(sqlite_url, server.port, emails)
        env = {
            **os.environ,
            "NEWSLETTER_DATABASE_URL": sqlite_url,
            "NEWSLETTER_SMTP_PORT": str(server.port),
            "NEWSLETTER_SECRET_KEY": "test-secret-key-not-for-production",
            "NEWSLETTER_ENTRY_WINDOW_DAYS": "36500",
            "NEWSLETTER_SMTP_CONNECTIONS": "2",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "newsletter", "send"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while len(server.accepted) < 15 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        accepted_at_kill = len(server.accepted)
        assert 0 < accepted_at_kill < len(emails), "the kill landed mid-run"

        restart = subprocess.run(
            [sys.executable, "-m", "newsletter", "send"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert restart.returncode == 0, restart.stderr
        counts = [server.accepted_for(e) for e in emails]
    lost = sum(1 for c in counts if c == 0)
    duplicates = sum(c - 1 for c in counts if c > 1)
    print(f"SIGKILL after {accepted_at_kill} accepted: lost={lost} duplicates={duplicates}")
    assert lost == 0
    assert duplicates <= 2, "at most one message in flight per connection"
    assert all(s == DeliveryStatus.SENT for s, _, _ in _statuses(app).values())
