"""`newsletter send` on several processes (newsletter.drain): the split, and a real run on
SQLite and PostgreSQL into a real SMTP server, every digest exactly once."""

from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import timedelta
from itertools import pairwise
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from conftest import RSS_FIXTURE, make_settings
from reliability.support import CountingSMTPServer, bulk_subscribers, cli_env
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from newsletter import db, digests, ingest
from newsletter.app import App
from newsletter.drain import (
    MIN_PER_PROCESS,
    IdRanges,
    PlanArgs,
    _load_and_ship,
    _received,
    _warm_up,
    collector_for_sending,
    connections_for,
    cpu_count,
    plan_processes,
)
from newsletter.matching import Profile
from newsletter.models import Delivery, DeliveryStatus, Entry, utcnow
from newsletter.sending import Sender


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


def _received_elsewhere(
    notice: multiprocessing.Queue[bool],
    shipped: Connection,
    results: multiprocessing.Queue[object],
    parent: int,
) -> None:
    """A helper's side, in a spawned process: what it matches with the index it received."""
    received = _received(notice, shipped, threading.Event(), parent)
    if received is None:
        results.put(None)
        return
    index, oldest = received
    results.put((oldest, [index.match(profile) for profile in SHIPPED_PROFILES]))


SHIPPED_PROFILES = [
    Profile(tuple(keywords), (), 5) for keywords in (["diffusion"], ["language model"], ["LLM"])
]


def test_the_index_is_built_once_and_shipped_to_the_helpers(db_url: str) -> None:
    """A helper process, given the file at its start, unpickles the index this process built
    (into the file, which has no name) and matches exactly as the original does. If building
    it fails here, the helpers are told to build their own."""
    app = App(make_settings(db_url, 25))
    app.init()
    with db.transaction(app.sessions) as session:
        ingest.add_feed(session, str(RSS_FIXTURE))
    (report,) = ingest.fetch_all(app)
    assert report.ok
    ctx = multiprocessing.get_context("spawn")
    notice: multiprocessing.Queue[bool] = ctx.Queue()
    results: multiprocessing.Queue[object] = ctx.Queue()
    args = PlanArgs(utcnow(), timedelta(days=30), "example.org", {})
    with tempfile.TemporaryFile() as shipment:
        shipped = Connection(os.dup(shipment.fileno()))
        helper = ctx.Process(
            target=_received_elsewhere, args=(notice, shipped, results, os.getpid())
        )
        helper.start()
        shipped.close()
        index, oldest = _load_and_ship(app, args, shipment, [notice])
        assert len(index) > 10
        assert results.get(timeout=60) == (
            oldest,
            [index.match(profile) for profile in SHIPPED_PROFILES],
        )
        helper.join(30)
    app.close()

    broken = App(make_settings(db_url, 25).replace(database_url="sqlite:///" + "/nonexistent/x.db"))
    told: multiprocessing.Queue[bool] = ctx.Queue()
    with tempfile.TemporaryFile() as shipment:
        shipped = Connection(os.dup(shipment.fileno()))
        helper = ctx.Process(target=_received_elsewhere, args=(told, shipped, results, os.getpid()))
        helper.start()
        shipped.close()
        with pytest.raises(OperationalError):
            _load_and_ship(broken, args, shipment, [told])
        assert results.get(timeout=60) is None, "told to build its own"
        helper.join(30)
    broken.close()


def test_a_helper_stops_waiting_for_the_index_when_stopped_or_orphaned() -> None:
    """Should the index never come (this process failed before building it), a helper that
    is told to stop, or whose parent is gone, stops waiting (and builds its own, or not)."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryFile() as shipment:
        stopped = threading.Event()
        stopped.set()
        handle = Connection(os.dup(shipment.fileno()))
        assert _received(ctx.Queue(), handle, stopped, os.getppid()) is None
        orphan = Connection(os.dup(shipment.fileno()))
        assert _received(ctx.Queue(), orphan, threading.Event(), parent=-1) is None


def test_a_helper_prepares_the_papers_while_it_waits_for_the_index(db_url: str) -> None:
    """While the index is built for it, a helper reads the window's papers and makes their
    template skeletons; its emails then make none, and are the emails a helper that did
    not prepare makes."""
    app = App(make_settings(db_url, 25))
    app.init()
    with db.transaction(app.sessions) as session:
        ingest.add_feed(session, str(RSS_FIXTURE))
    (report,) = ingest.fetch_all(app)
    assert report.ok and report.new_entries > 10
    args = PlanArgs(utcnow(), timedelta(days=30), "example.org", {})
    ctx = multiprocessing.get_context("spawn")
    notice: multiprocessing.Queue[bool] = ctx.Queue()
    prepared = Sender(app)
    steps = 0

    def meanwhile() -> Iterator[None]:
        nonlocal steps
        for step in _warm_up(prepared, app, args):
            steps += 1
            yield step
        notice.put(False)  # the index comes once everything is prepared

    with tempfile.TemporaryFile() as shipment:
        shipped = Connection(os.dup(shipment.fileno()))
        assert _received(notice, shipped, threading.Event(), os.getppid(), meanwhile()) is None
    made = prepared.renderer._skeletons_made
    assert made == report.new_entries and steps == made + 1, "one step reads, one per paper"

    plain = Sender(app)
    with app.session() as session:
        papers = session.scalars(select(Entry.id).where(digests.in_window(args.now, args.window)))
        papers = sorted(papers)
        plain.composer.read_papers(session, papers)
        index, _ = digests.load_for_plan(session, args.now, args.window, {}, highlights=True)
    assert len(papers) == made and not prepared.composer.missing(papers)
    for sender in (prepared, plain):
        sender.composer.use_index(index)
    for first in range(0, len(papers), 10):
        hits = (("diffusion", None, True), ("model", True, None))
        emails = []
        for sender in (prepared, plain):
            items = [sender.composer.paper_item(p, hits) for p in papers[first : first + 10]]
            digest = sender.composer.digest(
                subscriber_id=1,
                email="reader@example.org",
                period="2026-12-01",
                day=args.now.date(),
                message_id="<x@example.org>",
                items=items,
            )
            message = sender.renderer.message(digest, now=args.now)
            emails.append([part.get_content() for part in message.iter_parts()])
        assert emails[0] == emails[1] and len(emails[0]) == 2
    assert prepared.renderer._skeletons_made == made, "none made again"
    assert plain.renderer._skeletons_made == made
    app.close()


def test_a_helper_waiting_for_the_index_takes_it_between_two_steps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The steps a helper takes meanwhile never hold the index up (it is taken as soon as it
    comes, the rest of the steps left), and one that fails only ends them."""
    ctx = multiprocessing.get_context("spawn")
    notice: multiprocessing.Queue[bool] = ctx.Queue()
    taken = 0

    def endless() -> Iterator[None]:  # as good as: a million steps
        nonlocal taken
        while taken < 10**6:
            taken += 1
            if taken == 5:
                notice.put(False)
            yield

    def failing() -> Iterator[None]:
        yield
        # The next index comes while the steps fail: put here, not before the call, since a
        # queue's put reaches the reader on a thread of its own, so a notice put ahead could
        # arrive before the first step and no step would ever fail (a flaky run saw that).
        notice.put(False)
        raise RuntimeError("no database")

    with tempfile.TemporaryFile() as shipment:
        handle = Connection(os.dup(shipment.fileno()))
        assert _received(notice, handle, threading.Event(), os.getppid(), endless()) is None
        assert 5 <= taken < 10**6, "taken between two steps, the rest left"
        handle = Connection(os.dup(shipment.fileno()))
        assert _received(notice, handle, threading.Event(), os.getppid(), failing()) is None
    assert "preparing ahead of the index failed" in caplog.text


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
    alone = [b - a for a, b in IdRanges(1, 10_000, 500, ctx.Value("q", 0), 1)]
    assert alone == [500] * 20, "one process waits for nobody: full width to the end"


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


# Imported by other commands, not by `send`: each is start-up every `send` process paid for
# nothing (dnspython came with dkimpy even when DKIM is off, 70 ms; the feed and web-form
# libraries with the CLI, 90 ms; alembic to check the schema's revision, 75 ms). Checked in a
# fresh interpreter, as each process starts, against a real database.
NOT_FOR_SENDING = ("alembic", "dkim", "dns", "httpx", "feedparser", "nh3", "email_validator")
_IMPORTS = """
import sys
from newsletter.app import App
from newsletter.cli import run_send
from newsletter.config import Settings
from newsletter.drain import drain
from newsletter.sending import Sender
from newsletter.render import Renderer
settings = Settings(database_url=sys.argv[1], from_addr="Digest <digest@example.org>")
App(settings).check_ready()
Renderer(settings)
print(" ".join(sorted({name.partition(".")[0] for name in sys.modules})))
"""


def test_send_processes_do_not_import_what_only_other_commands_need(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ready.db'}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    loaded = subprocess.run(
        [sys.executable, "-c", _IMPORTS, url],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
    ).stdout.split()
    assert "sqlalchemy" in loaded and "jinja2" in loaded, "the probe saw the real imports"
    assert [name for name in NOT_FOR_SENDING if name in loaded] == []
