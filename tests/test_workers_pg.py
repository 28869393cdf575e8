"""Scaling out on PostgreSQL: several `newsletter worker` processes drain one queue, each
digest reaches the sink exactly once, and the rows of a worker killed mid-run are taken
over (after its lease, or at once when it died on the same host)."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import make_settings
from sqlalchemy import select
from test_service_support import (
    Proc,
    recipients,
    seed,
    sent_count,
    service_env,
    status_counts,
    wait_for,
)

from newsletter.app import App
from newsletter.digests import Due
from newsletter.models import Delivery, DeliveryStatus, utcnow
from newsletter.scheduler import plan_due
from newsletter.sending import Sender
from newsletter.sink import Sink
from newsletter.testsmtp import FaultySMTPServer, Rule

pytestmark = pytest.mark.postgres


def test_four_workers_drain_20k_exactly_once(pg_url: str, sink: Sink, tmp_path: Path) -> None:
    total = 20_000
    app = App(make_settings(pg_url, sink.port))
    planning = seed(app, total)
    began = time.monotonic()
    again = plan_due(app, Due(timedelta(hours=24)), utcnow())
    idle = time.monotonic() - began
    assert again.planned == 0 and again.subscribers == 0
    print(
        f"\nplanned {total} digests in {planning:.1f}s ({total / planning:.0f}/s); the next "
        f"minute's plan run over the same {total} subscribers took {idle * 1000:.0f} ms"
    )
    env = service_env(pg_url, sink.port, smtp_connections=4)
    began = time.monotonic()
    workers = [Proc(["worker"], env, tmp_path, f"worker{i}") for i in range(4)]
    try:
        wait_for("every digest sent", lambda: sent_count(app) == total, timeout=240, every=0.5)
        elapsed = time.monotonic() - began
        print(
            f"4 workers drained {total} deliveries in {elapsed:.1f}s: {total / elapsed:.0f} msg/s "
            f"(sink received {sink.received_count})"
        )
        for worker in workers:
            code, took = worker.stop()
            assert code == 0, worker.output()
            assert took < 10
    finally:
        for worker in workers:
            worker.kill()
    got = recipients(sink.maildir)
    assert len(got) == total and set(got.values()) == {1}, "each digest exactly once"
    assert status_counts(app) == {"sent": total}
    for i, worker in enumerate(workers):
        assert "send run done" in worker.output(), f"worker {i} took part"


def _killed_mid_run(
    pg_url: str, sink: Sink, tmp_path: Path, lease: float, first_host: str | None
) -> tuple[App, Proc, dict[int, datetime], int]:
    """Start one worker, SIGKILL it after some sends; returns its claims at that moment."""
    app = App(make_settings(pg_url, sink.port))
    total = 1500
    seed(app, total)
    env = service_env(pg_url, sink.port, smtp_connections=4, lease_seconds=lease)
    args = ["worker"] + (["--host-id", first_host] if first_host else [])
    victim = Proc(args, env, tmp_path, "victim")
    try:
        wait_for("the first worker to send", lambda: sink.received_count >= 300, timeout=60)
    finally:
        victim.signal(signal.SIGKILL)
        victim.wait()
    with app.session() as session:
        held = {
            delivery_id: until
            for delivery_id, until in session.execute(
                select(Delivery.id, Delivery.claimed_until).where(
                    Delivery.status == DeliveryStatus.SENDING
                )
            )
            if until is not None
        }
    assert held, "the kill landed while it held claimed rows"
    return app, victim, held, total


def test_killed_worker_rows_are_taken_over_after_the_lease(
    pg_url: str, sink: Sink, tmp_path: Path
) -> None:
    lease = 3.0
    app, _, held, total = _killed_mid_run(pg_url, sink, tmp_path, lease, first_host="host-a")
    env = service_env(pg_url, sink.port, smtp_connections=4, lease_seconds=lease)
    # Another host: the same-host shortcut cannot apply, only the lease can free the rows.
    survivor = Proc(["worker", "--host-id", "host-b"], env, tmp_path, "survivor")
    try:
        wait_for("the survivor to finish", lambda: sent_count(app) == total, timeout=120)
        assert survivor.stop()[0] == 0, survivor.output()
    finally:
        survivor.kill()
    with app.session() as session:
        taken = session.execute(
            select(Delivery.id, Delivery.sent_at).where(Delivery.id.in_(held))
        ).all()
    early = [i for i, sent_at in taken if sent_at is None or sent_at < held[i]]
    assert not early, "nothing the dead worker held was taken before its lease ended"
    got = recipients(sink.maildir)
    duplicates = sum(c - 1 for c in got.values())
    print(
        f"\nSIGKILLed worker held {len(held)} rows; taken over after the {lease:g}s lease; "
        f"lost {total - len(got)}, duplicates {duplicates} (limit: 4 in flight)"
    )
    assert len(got) == total, "nothing lost"
    assert duplicates <= 4, "at most the messages in flight on its 4 connections"


def test_killed_worker_on_this_host_is_taken_over_at_once(
    pg_url: str, sink: Sink, tmp_path: Path
) -> None:
    lease = 300.0  # long: only the same-host check can explain a quick takeover
    app, _, held, total = _killed_mid_run(pg_url, sink, tmp_path, lease, first_host=None)
    env = service_env(pg_url, sink.port, smtp_connections=4, lease_seconds=lease)
    survivor = Proc(["worker"], env, tmp_path, "survivor")
    try:
        took = wait_for("the survivor to finish", lambda: sent_count(app) == total, timeout=60)
        assert survivor.stop()[0] == 0, survivor.output()
    finally:
        survivor.kill()
    got = recipients(sink.maildir)
    duplicates = sum(c - 1 for c in got.values())
    print(
        f"\nSIGKILLed worker held {len(held)} rows; same host: taken over at once, all done "
        f"in {took:.1f}s; duplicates {duplicates}"
    )
    assert len(got) == total
    assert duplicates <= 4


def test_a_slow_worker_keeps_its_rows_by_renewing_its_lease(pg_url: str) -> None:
    """Sending everything it claimed takes several times its lease; the heartbeat keeps the
    rows its own, so a second worker on another host takes none and sends nothing twice."""
    total = 40
    with FaultySMTPServer(rules=lambda address: Rule("slow", delay=0.1)) as server:
        settings = make_settings(pg_url, server.port, lease_seconds=1.0, smtp_connections=2)
        slow, other = App(settings), App(settings)
        seed(slow, total)
        first = Sender(slow, worker_id="host-a:1:1")
        second = Sender(other, worker_id="host-b:1:1")
        runs = [threading.Thread(target=first.run), threading.Thread(target=second.run)]
        began = time.monotonic()
        runs[0].start()
        wait_for("the first worker to claim", lambda: len(server.accepted) >= 1, timeout=30)
        runs[1].start()
        for run in runs:
            run.join(60)
        took = time.monotonic() - began
        accepted = Counter(r for _, rcpts, _ in server.accepted for r in rcpts)
    print(
        f"\n{total} slow sends took {took:.1f}s with a 1s lease; second worker sent "
        f"{second.report.sent}"
    )
    assert took > 3, "long enough that an unrenewed lease would have run out"
    assert first.report.sent == total and second.report.sent == 0
    assert len(accepted) == total and set(accepted.values()) == {1}
    for app in (slow, other):
        app.close()
