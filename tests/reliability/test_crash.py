"""Crashes: `newsletter send` to 5,000 subscribers is killed with SIGKILL at 20 random moments
(seeded) and restarted each time, then run to completion. The server must end up with every
digest, and a second copy only of messages that were in flight at a kill.

"In flight" is measured, not assumed: for each killed run, the copies the server accepted
during that run minus the ledger rows that became `sent` during it. That difference is
exactly the set of messages whose 250 the dead process never recorded, i.e. the resends the
next run will make; the README bounds it by `smtp_connections` per kill.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import RSS_FIXTURE, make_settings
from sqlalchemy import func, select

from newsletter import db, ingest
from newsletter.app import App
from newsletter.models import Delivery, DeliveryStatus, Subscriber

from .conftest import FigureRecorder
from .support import CountingSMTPServer, bulk_subscribers, cli_env

SEED = 20240611
SUBSCRIBERS = 5000
KILLS = 20
CONNECTIONS = 4
# Each matches at least one paper of the fixture feed, so every subscriber is due a digest.
KEYWORDS = [
    "diffusion",
    "equivariant",
    "quantum optimization",
    "symmetry",
    "inverse problems",
    "Schrödinger bridge",
    "Bayesian",
    "tensor products",
]


@dataclass
class Kill:
    mode: str  # "time": a random delay after start; "count": after N more accepted messages
    target: str
    accepted_in_run: int
    sent_in_run: int
    in_flight: int  # accepted by the server in this run but not recorded as sent
    seconds: float


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process group {pgid} still alive {timeout}s after SIGKILL")


def _sent(app: App) -> int:
    with app.session() as session:
        return int(
            session.scalar(select(func.count()).where(Delivery.status == DeliveryStatus.SENT)) or 0
        )


def _storm(
    db_url: str,
    tmp_path: Path,
    figures: FigureRecorder,
    label: str,
    subscribers: int,
    kills_wanted: int,
) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    with CountingSMTPServer() as server:
        app = App(make_settings(db_url, server.port, smtp_connections=CONNECTIONS))
        app.init()
        with db.transaction(app.sessions) as session:
            ingest.add_feed(session, str(RSS_FIXTURE))
        (report,) = ingest.fetch_all(app)
        assert report.ok and report.new_entries == 44, report.message
        emails = [f"reader{i:05d}@example.org" for i in range(subscribers)]
        # Two papers per digest: what is measured is the ledger, not the layout, and a
        # shorter email keeps 5,000 of them inside the time budget.
        bulk_subscribers(app, emails, lambda i, _: [KEYWORDS[i % len(KEYWORDS)]], max_items=2)
        setup_seconds = time.monotonic() - started

        env = cli_env(db_url, server.port, NEWSLETTER_SMTP_CONNECTIONS=str(CONNECTIONS))
        log = (tmp_path / "send.log").open("w")
        kills: list[Kill] = []
        # Kills after at most this many messages, so all of them land before the end.
        max_batch = max(1, int(subscribers * 0.7 / kills_wanted))
        # Three in five kills wait for mail to be going out; the rest are timed from start-up
        # and land wherever this machine's speed puts them (start-up, planning or sending). The
        # split is fixed and only the order is random, so the coverage of the sending phase
        # does not depend on how loaded the machine is.
        count_kills = (kills_wanted * 3 + 4) // 5
        modes = ["count"] * count_kills + ["time"] * (kills_wanted - count_kills)
        rng.shuffle(modes)
        for k, planned_mode in enumerate(modes):
            accepted_before, sent_before = server.total, _sent(app)
            if planned_mode == "time":
                # Anywhere from interpreter start-up through planning into sending.
                mode, delay = "time", rng.uniform(0.05, 1.3)
                target = f"{delay:.2f}s after start"
            else:
                mode, more = "count", rng.randint(1, max_batch)
                target = f"after {more} more accepted"
            run_started = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "newsletter", "send"],
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: `send` and its helpers
            )
            if mode == "time":
                # Woken early only if the run ends by itself (which fails the test below).
                server.wait_for(lambda _, proc=proc: proc.poll() is not None, timeout=delay)
            else:
                goal = accepted_before + more
                reached = server.wait_for(
                    lambda total, goal=goal, proc=proc: total >= goal or proc.poll() is not None,
                    timeout=60,
                )
                assert reached, f"kill {k}: no progress within 60 s"
            assert proc.poll() is None, f"kill {k}: the run finished before the kill landed"
            # The whole `send` dies at once (its helper processes too, as in a machine crash
            # or an OOM kill), and the figures are read only once none of it is left: a
            # helper's commit still in flight is counted in this run, not the next.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _wait_group_gone(proc.pid)
            server.barrier()  # count what the dead client had already handed over
            accepted, sent = server.total - accepted_before, _sent(app) - sent_before
            kills.append(
                Kill(mode, target, accepted, sent, accepted - sent, time.monotonic() - run_started)
            )

        final = subprocess.run(
            [sys.executable, "-m", "newsletter", "send"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert final.returncode == 0, final.stdout + final.stderr
        server.barrier()
        counts = server.counts()
        message_ids = server.message_ids()
        again = subprocess.run(
            [sys.executable, "-m", "newsletter", "send"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 0, again.stdout + again.stderr
        server.barrier()
        assert server.counts() == counts, "a run after completion sends nothing"

    with app.session() as session:
        planned = dict(
            session.execute(
                select(Subscriber.email, Delivery.status).join(
                    Delivery, Delivery.subscriber_id == Subscriber.id
                )
            ).all()
        )
    app.close()
    lost = [e for e in emails if counts[e] == 0]
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    mid_send = sum(1 for kill in kills if kill.accepted_in_run > 0)
    max_in_flight = max(kill.in_flight for kill in kills)
    total_in_flight = sum(kill.in_flight for kill in kills)
    seconds = time.monotonic() - started

    print(
        f"\n[{label}] {subscribers} subscribers, {kills_wanted} SIGKILLs, seed {SEED}, "
        f"{CONNECTIONS} SMTP connections (setup {setup_seconds:.1f}s)"
    )
    print("  kill  mode   moment                        accepted  sent  in-flight  secs")
    for i, kill in enumerate(kills):
        print(
            f"  {i:>4}  {kill.mode:<5}  {kill.target:<28}  {kill.accepted_in_run:>8}  "
            f"{kill.sent_in_run:>4}  {kill.in_flight:>9}  {kill.seconds:>4.1f}"
        )
    print(
        f"  lost={len(lost)} duplicates={duplicates} max_in_flight={max_in_flight} "
        f"kills_mid_send={mid_send} seconds={seconds:.1f}"
    )

    figures.add("subscribers", subscribers)
    figures.add("kills", len(kills), f"SIGKILL, seed {SEED}; {mid_send} landed mid-send")
    figures.add("lost", len(lost), "digests never received")
    figures.add(
        "duplicates",
        duplicates,
        f"bound: in flight at the kills = {total_in_flight} (<= {CONNECTIONS}/kill)",
    )
    figures.add("max in flight", max_in_flight, f"smtp_connections = {CONNECTIONS}")
    figures.add("run seconds", round(seconds, 1))

    assert len(planned) == subscribers, "every subscriber was due exactly one digest"
    assert all(s == DeliveryStatus.SENT for s in planned.values()), "the ledger says all sent"
    assert set(counts) == set(emails), "nobody outside the list got mail"
    assert lost == [], f"{len(lost)} digests lost, e.g. {lost[:5]}"
    assert len(kills) == kills_wanted
    assert mid_send >= count_kills, "every count-mode kill must land while mail is going out"
    assert all(0 <= kill.in_flight <= CONNECTIONS for kill in kills), kills
    # Every duplicate is one of the measured in-flight messages, and nothing else.
    assert duplicates == total_in_flight
    assert duplicates <= kills_wanted * CONNECTIONS
    for email, ids in message_ids.items():
        assert len(set(ids)) == 1, f"{email}: a resend must carry the same Message-ID: {ids}"


def test_sigkill_storm_sqlite(tmp_path: Path, sqlite_url: str, figures: FigureRecorder) -> None:
    _storm(sqlite_url, tmp_path, figures, "sqlite", SUBSCRIBERS, KILLS)


@pytest.mark.postgres
def test_sigkill_storm_postgresql(tmp_path: Path, pg_url: str, figures: FigureRecorder) -> None:
    """The same storm, at the same size, on PostgreSQL."""
    _storm(pg_url, tmp_path, figures, "postgresql", SUBSCRIBERS, KILLS)
