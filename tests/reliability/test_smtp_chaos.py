"""A misbehaving SMTP server: random 421/451/dropped connections in DATA, slow replies that
time out on our side, 550 at RCPT; and a server that is down when the run starts and comes back.

Every good address must be delivered exactly once, refused ones suppressed and never retried,
the run must end, and the ledger must say what happened to each delivery. The server's own view
(one RCPT per attempt) is compared with the ledger's attempt counts, row by row.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from pathlib import Path

from conftest import RSS_FIXTURE, make_settings
from sqlalchemy import select

from newsletter import db, ingest
from newsletter.app import App
from newsletter.cli import run_send
from newsletter.models import Delivery, DeliveryStatus, Subscriber, SubscriberStatus
from newsletter.testsmtp import FaultySMTPServer, Rule

from .conftest import FigureRecorder
from .support import bulk_subscribers, free_port

GOOD, SLOW, REJECTED = 240, 6, 12
RANDOM_FAULTS = 0.25
SEED = 7
SLOW_DELAY = 2.0  # seconds the server waits before answering RCPT (and again before DATA)
SMTP_TIMEOUT = 0.5
MAX_ATTEMPTS = 12  # P(a good address draws 11 random faults in a row) = 0.25**11 < 3e-7


def _prepare(db_url: str, port: int, emails: list[str], **settings: object) -> App:
    app = App(make_settings(db_url, port, **settings))
    app.init()
    with db.transaction(app.sessions) as session:
        ingest.add_feed(session, str(RSS_FIXTURE))
    (report,) = ingest.fetch_all(app)
    assert report.ok, report.message
    kws = ["diffusion", "equivariant", "quantum optimization", "symmetry"]
    bulk_subscribers(app, emails, lambda i, _: [kws[i % len(kws)]], max_items=3)
    return app


def _ledger(app: App) -> dict[str, tuple[DeliveryStatus, int, str | None, str | None]]:
    with app.session() as session:
        rows = session.execute(
            select(
                Subscriber.email,
                Delivery.status,
                Delivery.attempts,
                Delivery.smtp_reply,
                Delivery.error,
            ).join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        )
        return {
            email: (status, attempts, reply, error)
            for email, status, attempts, reply, error in rows
        }


def test_chaotic_server(db_url: str, figures: FigureRecorder) -> None:
    good = [f"good{i:03d}@example.org" for i in range(GOOD)]
    slow = [f"slow{i}@example.org" for i in range(SLOW)]
    rejected = [f"gone{i:02d}@example.org" for i in range(REJECTED)]
    rules = {
        **{e: Rule("slow", delay=SLOW_DELAY, times=1) for e in slow},
        **{e: Rule("reject_rcpt", code=550) for e in rejected},
    }
    rcpt_seen: Counter[str] = Counter()  # the server's count of attempts, one RCPT each
    lock = threading.Lock()

    slow_started: list[float] = []  # when each slow address's slow transaction began

    def rule_for(address: str) -> Rule | None:
        key = address.casefold()
        with lock:
            rcpt_seen[key] += 1
            if key in slow and rcpt_seen[key] == 1:
                slow_started.append(time.monotonic())
        return rules.get(key)

    server = FaultySMTPServer(rules=rule_for, random_faults=RANDOM_FAULTS, seed=SEED)
    with server:
        app = _prepare(
            db_url,
            server.port,
            good + slow + rejected,
            smtp_connections=4,
            smtp_timeout=SMTP_TIMEOUT,
            max_attempts=MAX_ATTEMPTS,
            retry_base_seconds=0.05,
            retry_max_seconds=0.2,
        )
        started = time.monotonic()
        assert run_send(app) == 0
        run_seconds = time.monotonic() - started
        # A transaction we gave up on may still complete on the server later: wait out the
        # last slow one it could be in the middle of (delay before RCPT + delay before DATA).
        assert len(slow_started) == SLOW
        settle = max(slow_started) + 2 * SLOW_DELAY + 0.2 - time.monotonic()
        threading.Event().wait(max(settle, 0.0))
        ledger = _ledger(app)
        accepted = Counter(r.casefold() for _, rcpts, _ in server.accepted for r in rcpts)
        seen_before_rerun = Counter(rcpt_seen)

        # A second run changes nothing: no retry of a refused address, no resend.
        assert run_send(app) == 0
        assert Counter(r.casefold() for _, rcpts, _ in server.accepted for r in rcpts) == accepted
        assert rcpt_seen == seen_before_rerun, "the rerun talked to the server about someone"

    with app.session() as session:
        subs = {s.email: s for s in session.scalars(select(Subscriber))}
    app.close()

    # Good addresses, including the slow ones once their slow transaction is over.
    for email in good + slow:
        status, attempts, reply, error = ledger[email]
        assert status == DeliveryStatus.SENT, (email, ledger[email])
        assert reply and reply.startswith("250"), "the server's 250 is kept"
        assert error is None
        assert attempts == rcpt_seen[email], (
            f"{email}: the ledger counts {attempts} attempts, the server saw {rcpt_seen[email]}"
        )
    for email in good:
        assert accepted[email] == 1, f"{email} delivered {accepted[email]} times"
    late_duplicates = sum(accepted[e] - 1 for e in slow)
    for email in slow:
        assert accepted[email] >= 1
        assert ledger[email][1] >= 2, "the slow first try timed out and was retried"
    assert late_duplicates <= SLOW, "at most the one timed-out transaction per slow address"

    # Refused addresses: suppressed at once, never retried, reason kept on both sides.
    for email in rejected:
        status, attempts, reply, error = ledger[email]
        assert (status, attempts) == (DeliveryStatus.FAILED, 1), (email, ledger[email])
        assert reply and reply.startswith("550") and error and error.startswith("550")
        assert rcpt_seen[email] == 1 and accepted[email] == 0
        sub = subs[email]
        assert sub.status == SubscriberStatus.BOUNCED
        assert sub.status_reason and "550" in sub.status_reason

    retries = sum(attempts - 1 for _, attempts, _, _ in ledger.values())
    random_faults = sum(ledger[e][1] - 1 for e in good)
    assert random_faults > 0, "the random faults did fire"
    histogram = Counter(ledger[e][1] for e in good + slow)
    print(
        f"\n[{db_url.split(':')[0]}] attempts per delivered digest: {sorted(histogram.items())}; "
        f"retries {retries}; late duplicates {late_duplicates}; run {run_seconds:.1f}s"
    )
    figures.add(
        "good delivered once",
        f"{sum(accepted[e] == 1 for e in good)}/{len(good)}",
        f"random 421/451/drop at DATA p={RANDOM_FAULTS}",
    )
    figures.add(
        "slow delivered",
        f"{sum(accepted[e] >= 1 for e in slow)}/{len(slow)}",
        f"{SLOW_DELAY:g}s per reply vs smtp_timeout {SMTP_TIMEOUT:g}s",
    )
    figures.add(
        "late duplicates",
        late_duplicates,
        "accepted by the server after we timed out (counted apart)",
    )
    figures.add(
        "550 suppressed",
        f"{sum(subs[e].status == SubscriberStatus.BOUNCED for e in rejected)}/{len(rejected)}",
        "attempts == 1 each",
    )
    figures.add("retries", retries, "ledger attempts - 1, summed; equal to server RCPTs - 1")
    figures.add("max attempts used", max(histogram), f"of max_attempts={MAX_ATTEMPTS}")
    figures.add("run seconds", round(run_seconds, 1))


def test_server_down_at_start_then_back(
    db_url: str, tmp_path: Path, figures: FigureRecorder
) -> None:
    """Nothing listens when `send` starts; then the port accepts connections and closes them
    (a server still starting); then the real server comes up on the same port. The run waits
    (smtp_unreachable_patience), delivers everything once and counts no attempt for the
    outage."""
    port = free_port()
    emails = [f"reader{i:02d}@example.org" for i in range(30)]
    app = _prepare(db_url, port, emails, smtp_connections=2, smtp_unreachable_patience=30.0)
    with app.session() as session:
        assert session.scalar(select(Delivery.id)) is None

    result: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        result["code"] = run_send(app)
        result["seconds"] = time.monotonic() - started

    sender = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    sender.start()

    # Phase 1: connection refused, until the run has planned its digests and claimed some,
    # and then for a 0.3 s floor (less than the sender's first 0.5 s pause), so its first
    # connection attempts meet a closed port.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with app.session() as session:
            if session.scalar(select(Delivery.id).where(Delivery.status == DeliveryStatus.SENDING)):
                break
        threading.Event().wait(0.02)
    else:
        raise AssertionError("the run never claimed a delivery")
    threading.Event().wait(0.3)

    # Phase 2: the port is open but the service hangs up at once; wait for two tries.
    half_up = socket.create_server(("127.0.0.1", port))
    half_up.settimeout(20)
    refused_while_half_up = 0
    try:
        for _ in range(2):
            conn, _ = half_up.accept()
            conn.close()
            refused_while_half_up += 1
    finally:
        half_up.close()
    outage = time.monotonic() - started
    with app.session() as session:
        assert not session.scalar(
            select(Delivery.id).where(Delivery.status == DeliveryStatus.SENT)
        ), "nothing can be sent while the server is down"

    # Phase 3: the server is back on the same port.
    with FaultySMTPServer(port=port) as server:
        sender.join(timeout=40)
        assert not sender.is_alive(), "the run did not end after the server came back"
        counts = Counter(r.casefold() for _, rcpts, _ in server.accepted for r in rcpts)
    ledger = _ledger(app)
    app.close()
    assert result["code"] == 0
    assert counts == Counter({e: 1 for e in emails}), "everyone once, nobody twice"
    assert all(v[0] == DeliveryStatus.SENT and v[1] == 1 for v in ledger.values()), (
        "an unreachable server costs no attempt: each row was sent on its first real try"
    )
    print(
        f"\n[{db_url.split(':')[0]}] outage {outage:.1f}s "
        f"({refused_while_half_up} hang-ups seen), whole run {result['seconds']:.1f}s"
    )
    figures.add(
        "down at start: delivered once",
        f"{sum(counts.values())}/{len(emails)}",
        f"outage {outage:.1f}s; patience 30s",
    )
    figures.add("down at start: attempts counted for outage", 0)
    figures.add("down at start: run seconds", round(float(result["seconds"]), 1))
