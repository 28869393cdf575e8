"""`newsletter send` on several processes (newsletter.drain): the split, and a real run on
SQLite and PostgreSQL into a real SMTP server, every digest exactly once."""

from __future__ import annotations

import gc
import multiprocessing
import subprocess
import sys
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import RSS_FIXTURE, make_settings
from reliability.support import CountingSMTPServer, bulk_subscribers, cli_env
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from newsletter import db, ingest
from newsletter.app import App
from newsletter.drain import (
    MIN_PER_PROCESS,
    IdRanges,
    PlanArgs,
    _load_and_ship,
    _received,
    collector_for_sending,
    connections_for,
    cpu_count,
    plan_processes,
)
from newsletter.matching import Profile
from newsletter.models import Delivery, DeliveryStatus, utcnow


def test_process_count_follows_setting_cores_connections_and_size() -> None:
    s = make_settings("sqlite://", 25, smtp_connections=8)
    assert plan_processes(s, 100_000) == min(cpu_count(), 8), "one per core by default"
    assert plan_processes(s.replace(send_processes=3), 100_000) == 3
    assert plan_processes(s.replace(send_processes=16), 100_000) == 8, (
        "never more processes than connections to share"
    )
    assert plan_processes(s.replace(send_processes=4), 2 * MIN_PER_PROCESS) == 2
    assert plan_processes(s.replace(send_processes=4), 10) == 1, "a small run stays in one"
    for total in (1, 2, 7, 8, 33):
        for processes in range(1, min(total, 8) + 1):
            s = make_settings("sqlite://", 25, smtp_connections=total)
            shares = [connections_for(s, processes, i) for i in range(processes)]
            assert sum(shares) == total and min(shares) >= 1, (total, processes, shares)


def test_two_processes_send_every_digest_exactly_once(db_url: str, tmp_path: Path) -> None:
    subscribers = 3 * MIN_PER_PROCESS
    with CountingSMTPServer() as server:
        app = App(make_settings(db_url, server.port))
        app.init()
        with db.transaction(app.sessions) as session:
            ingest.add_feed(session, str(RSS_FIXTURE))
        (report,) = ingest.fetch_all(app)
        assert report.ok
        emails = [f"reader{i:05d}@example.org" for i in range(subscribers)]
        bulk_subscribers(app, emails, lambda i, _: ["diffusion"], max_items=2)
        env = cli_env(db_url, server.port, NEWSLETTER_SEND_PROCESSES="2")
        run = subprocess.run(
            [sys.executable, "-m", "newsletter", "send"],
            env={**env, "NEWSLETTER_SMTP_CONNECTIONS": "4"},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        server.barrier()
        assert "by 2 processes" in run.stdout, run.stdout
        counts = server.counts()
        assert sorted(counts) == emails, "everyone got a digest"
        assert set(counts.values()) == {1}, "nobody got two"
        with app.session() as session:
            sent = session.scalar(
                select(func.count()).where(Delivery.status == DeliveryStatus.SENT)
            )
        assert sent == subscribers, "the ledger says so too"
        app.close()


def test_the_index_is_built_once_and_shipped_to_the_helpers(db_url: str) -> None:
    """The helpers unpickle the index this process built, and it matches as the original
    does. If building it fails here, or its file is gone by the time a helper looks, they
    are told (None) to build their own."""
    app = App(make_settings(db_url, 25))
    app.init()
    with db.transaction(app.sessions) as session:
        ingest.add_feed(session, str(RSS_FIXTURE))
    (report,) = ingest.fetch_all(app)
    assert report.ok
    ctx = multiprocessing.get_context("spawn")
    helpers = [ctx.Queue(), ctx.Queue()]
    args = PlanArgs(utcnow(), timedelta(days=30), "example.org", {})
    (index, oldest), shipped = _load_and_ship(app, args, helpers)
    assert len(index) > 10 and shipped is not None
    for helper in helpers:
        received = _received(helper)
        assert received is not None and received[1] == oldest
        for keywords in (["diffusion"], ["language model", "reasoning"], ["LLM"]):
            profile = Profile(tuple(keywords), (), 5)
            assert received[0].match(profile) == index.match(profile)
    _, again = _load_and_ship(app, args, helpers[:1])
    assert again is not None
    again.unlink()
    assert _received(helpers[0]) is None, "removed before this helper came for it"
    shipped.unlink()
    app.close()

    broken = App(make_settings(db_url, 25).replace(database_url="sqlite:///" + "/nonexistent/x.db"))
    with pytest.raises(OperationalError):
        _load_and_ship(broken, args, helpers)
    assert [_received(helper) for helper in helpers] == [None, None]
    broken.close()


def test_id_ranges_are_shared_out_once_each_between_processes() -> None:
    """Every process iterates the same `IdRanges` (one shared counter): each range goes to
    exactly one of them, and together they cover every id, each once."""
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("q", 0)
    first, second = IdRanges(7, 1_000, 50, counter, 2), IdRanges(7, 1_000, 50, counter, 2)
    taken: list[tuple[int, int]] = []
    for a, b in zip(first, second, strict=False):
        taken += [a, b]
    taken += list(first) + list(second)
    taken.sort()
    assert taken[0][0] == 7 and taken[-1][1] > 1_000 >= taken[-1][0], "from first to last id"
    assert all(a[1] == b[0] for a, b in pairwise(taken)), "no gap, no overlap"
    assert list(IdRanges(1, 0, 50, ctx.Value("q", 0))) == [], "no subscribers: nothing to plan"


def test_id_ranges_narrow_towards_the_end() -> None:
    """Full width while plenty is left, so each range is planned and written in one go;
    narrower near the end (never under an eighth), so no process is left sending a whole
    range on its own while the others are done."""
    ctx = multiprocessing.get_context("spawn")
    widths = [b - a for a, b in IdRanges(1, 10_000, 500, ctx.Value("q", 0), 2)]
    assert widths[:4] == [500] * 4
    assert all(a >= b for a, b in pairwise(widths)), widths
    assert widths[-2] == 62, "an eighth of the full width at the end"
    assert sum(widths) >= 10_000
    assert len(widths) < 40, "not many more ranges than equal widths (20) would make"


def test_send_gc_settings_are_undone_after_the_run_even_when_it_fails() -> None:
    """`send` collects cycles rarely and freezes what it loaded; a service process sends many
    times, so the next run (and everything between) must find the collector as it was."""
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), collector_for_sending():
        assert gc.get_threshold() != before
        assert gc.get_freeze_count() > 0
        raise RuntimeError("the run failed")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
