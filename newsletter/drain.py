"""`newsletter send` on every core: several processes plan and send side by side.

Planning, rendering and SMTP are CPU-bound Python, so one process tops out at one core whatever
its threads do. Each process therefore plans a share of the period's digests and sends them
itself, straight from memory, as soon as each batch is in the ledger (written already claimed
by that process: `digests.Claim`). Shares are ranges of subscriber ids handed out one at a time
to whichever process asks next (`IdRanges`), so a process that sends faster plans more and all
finish together. The ledger already makes concurrent senders safe (rows claimed with a lease,
an outcome committed before a connection takes its next message), so:

- ``smtp_connections`` stays the total the operator allows towards the server (servers limit
  connections per client): it is split between the processes, so a crash still leaves at most
  that many messages accepted but unrecorded;
- children die with the parent (``PR_SET_PDEATHSIG``): a `send` killed by SIGKILL takes its
  helpers with it, and a restart finds nothing still running behind its back;
- SIGINT/SIGTERM stop every process the graceful way (finish or hand back what is in flight);
- a child that dies anyway leaves its rows claimed under its pid, and may have taken ranges it
  did not finish planning; the parent plans again (everyone without this period's digest) and
  takes the rows over at once (claims by dead local pids need no lease to run out) in a last
  pass.
"""

from __future__ import annotations

import ctypes
import gc
import io
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.sharedctypes import Synchronized
from typing import IO, TYPE_CHECKING, TypeAlias, cast

from sqlalchemy import func, select

from newsletter import digests
from newsletter.app import App
from newsletter.config import Settings
from newsletter.digests import Claim, IdRange, PlanReport, WrittenBatch
from newsletter.exiting import exit_quickly
from newsletter.matching import MatchIndex
from newsletter.models import Entry, Subscriber, SubscriberStatus
from newsletter.sending import Sender, SendReport

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

# Below this many digests per process, starting another interpreter costs more than it saves.
MIN_PER_PROCESS = 500
# Subscriber ids per share of the plan: small enough that the processes finish together and
# that a share's insert holds SQLite's one write lock only briefly (and the SMTP connections
# wait only briefly while the thread that drives them plans), large enough to batch. 250
# against 500, in alternating runs: 10,000 readers 6.13 s against 6.38 s on average (4
# pairs), but 100,000 readers 2-8% slower in three pairs of four (a share costs some CPU
# whatever its size), with a peak of 204-207 MB against 223-227 MB; the short sends are the
# ones near their target.
RANGE_WIDTH = 250
_PR_SET_PDEATHSIG = 1


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_processes(settings: Settings, pending: int) -> int:
    """How many processes to use for about `pending` digests: the setting (0 means one per
    core), no more than there are connections to share, and none that would sit nearly idle.
    On SQLite too: its one writer at a time is shared, but rendering and SMTP are not (10,000
    digests: 25.5 s with two processes, 29.5 s with one, measured with benchmarks/)."""
    wanted = settings.send_processes or cpu_count()
    return max(1, min(wanted, settings.smtp_connections, pending // MIN_PER_PROCESS))


def connections_for(settings: Settings, processes: int, index: int) -> int:
    """Process `index`'s share of `smtp_connections` (the shares add up to the total)."""
    base, extra = divmod(settings.smtp_connections, processes)
    return base + (1 if index < extra else 0)


@dataclass
class DrainReport:
    total: SendReport
    per_process: list[int] = field(default_factory=list)  # digests sent by each process
    died: list[str] = field(default_factory=list)
    plan: PlanReport | None = None  # all processes' planning, when there was any


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: a killed parent's helpers finish their rows
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


@dataclass(frozen=True, slots=True)
class PlanArgs:
    """What planning needs besides the database; crosses to the helper processes."""

    now: datetime
    window: timedelta
    domain: str
    synonyms: Mapping[str, Sequence[str]]


class IdRanges:
    """Subscriber ids from `first` to `last` in ranges, each handed out once, to whichever of
    `parts` processes asks next (the counter, shared between them, holds how far the ranges
    have got). Ranges are `width` ids wide until the end is near, then narrower, down to an
    eighth of that: the process that takes the last range sends it while the others have
    nothing left to do, so the last ranges must be short. (With equal ranges of 500, 10,000
    readers on two processes: one process finished 0.25-0.43 s before the other.)"""

    def __init__(
        self, first: int, last: int, width: int, counter: Synchronized[int], parts: int = 1
    ) -> None:
        self.first, self.last, self.width, self.counter = first, last, width, counter
        self.parts = parts

    def __iter__(self) -> Iterator[IdRange]:
        while True:
            with self.counter.get_lock():
                start = self.first + self.counter.value
                if start > self.last:
                    return
                width = self.width
                if self.parts > 1:  # alone, nobody waits for the last range
                    # A quarter of each process's share of what is left, in [width/8, width].
                    share = -(-(self.last - start + 1) // (4 * self.parts))
                    width = max(1, min(width, max(width // 8, share)))
                self.counter.value += width
            yield start, start + width


def id_ranges(app: App, ctx: BaseContext | None = None, parts: int = 1) -> IdRanges:
    """Active subscribers' ids in ranges of about `RANGE_WIDTH` of them each, for `parts`
    processes."""
    with app.session() as session:
        first, last, count = session.execute(
            select(func.min(Subscriber.id), func.max(Subscriber.id), func.count()).where(
                Subscriber.status == SubscriberStatus.ACTIVE
            )
        ).one()
    counter = (ctx or multiprocessing.get_context()).Value("q", 0)
    if not count:
        return IdRanges(0, -1, 1, counter, parts)
    width = -(-(last - first + 1) * RANGE_WIDTH // count)  # ids are not always dense
    return IdRanges(first, last, width, counter, parts)


# Python's cyclic collector, as `send` has it while it runs: the young generation collected
# after 50,000 new objects instead of 700, and what is loaded before the run (the planner's
# index, settings, templates) left out of every collection.
_SEND_GC_THRESHOLD = (50_000, 20, 100)


@contextmanager
def collector_for_sending() -> Iterator[None]:
    """Collect cycles less often while sending, sparing what is already loaded. A run makes
    millions of short-lived objects that reference counting frees on its own, and each time
    the collector ran because of them it walked the whole index and caches: 0.5-0.7 s a
    process for 10,000 readers, 4-5 s for 100,000 (gc.callbacks), ~0.15 s with this. Undone
    afterwards: a service process sends many times, and what was frozen must be collectable
    again once it is garbage."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*_SEND_GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


Loaded = tuple[MatchIndex, int]  # what `digests.load_for_plan` gives
IndexNotice: TypeAlias = "multiprocessing.Queue[bool]"  # whether `Loaded` was written


def _load(app: App, args: PlanArgs) -> Loaded:
    with app.session() as session:
        return digests.load_for_plan(session, args.now, args.window, args.synonyms, highlights=True)


class _ReadAt(io.RawIOBase):
    """An open file read from its start with `os.pread`: its offset, shared with every other
    process holding the same open file, is left alone."""

    def __init__(self, fd: int) -> None:
        self._fd, self._at = fd, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = os.pread(self._fd, len(view), self._at)
        view[: len(data)] = data
        self._at += len(data)
        return len(data)


def _load_and_ship(
    app: App, args: PlanArgs, shipment: IO[bytes], helpers: Sequence[IndexNotice]
) -> Loaded:
    """The planner's index, built here and handed to each helper process: they start while
    it is built, and unpickling it costs them 0.1 s where building it took 0.7-0.8 s (2,000
    papers). It goes through `shipment`, a temporary file without a name that each helper
    was given at its start (so nothing is left behind whoever dies, and nobody else can
    put a file in its place), read as a stream: through a queue it made two 12 MB copies in
    each process and raised their peak memory by 10 MB. The helpers hear whether it is
    there; if not (building failed, or the file could not be written), they build their own."""
    written = False
    try:
        loaded = _load(app, args)
        try:
            pickle.dump(loaded, shipment, protocol=pickle.HIGHEST_PROTOCOL)
            shipment.flush()
            written = True
        except OSError as exc:  # a full or read-only temporary folder: not worth failing for
            log.warning(
                "could not hand the index to the helper processes (%s): each builds its own", exc
            )
        return loaded
    finally:
        for helper in helpers:
            helper.put(written)
            helper.close()
        shipment.close()  # the helpers hold it open for as long as they need it


def _warm_up(sender: Sender, app: App, args: PlanArgs) -> Iterator[None]:
    """What a helper can do, a short step at a time, while the index is being built for it
    (0.5-0.7 s for 2,000 papers, with nothing else to do): read the window's papers and make
    each one's template skeleton, as its first emails would otherwise."""
    with app.session() as session:
        ids = session.scalars(select(Entry.id).where(digests.in_window(args.now, args.window)))
        papers = list(ids)
        sender.composer.read_papers(session, papers)
    yield
    yield from sender.composer.prepare(papers)


def _received(
    notice: IndexNotice,
    shipped: Connection,
    stop: threading.Event,
    parent: int,
    meanwhile: Iterator[None] | None = None,
) -> Loaded | None:
    """The index `_load_and_ship` handed over, or None: build your own (also when this
    process is stopped, or its parent is gone, before the index came). Until it comes,
    the steps of `meanwhile` are taken, one between two looks at `notice`; a step that
    fails ends them (their work is only ahead of time)."""
    try:
        while True:
            try:
                written = notice.get_nowait() if meanwhile is not None else notice.get(timeout=0.5)
                break
            except queue.Empty:
                if stop.is_set() or os.getppid() != parent:
                    return None
            if meanwhile is not None:
                try:
                    if next(meanwhile, False) is False:
                        meanwhile = None
                except Exception:
                    log.exception("preparing ahead of the index failed; going on without")
                    meanwhile = None
        if not written:
            return None
        with io.BufferedReader(_ReadAt(shipped.fileno()), 1 << 16) as stream:
            return cast(Loaded, pickle.load(stream))
    finally:
        shipped.close()


def _work(
    app: App,
    args: PlanArgs | None,
    ranges: IdRanges | None,
    on_event: Callable[[str, int], None],
    stop: threading.Event,
    loaded: Loaded | None = None,
    sender: Sender | None = None,
) -> tuple[SendReport, PlanReport | None]:
    """One process's part: plan its share (if `args`) and send it, then whatever is due.
    `loaded`: the planner's index, if this process was given it; `sender`: the one to send
    with, if it was made ahead (see `_warm_up`)."""
    sender = sender or Sender(app, on_event=on_event, stop=stop)
    if args is None:
        with collector_for_sending():
            return sender.run(), None
    report = PlanReport()
    if loaded is None:
        loaded = _load(app, args)
    sender.composer.use_index(loaded[0])  # the planner's analysis highlights the emails

    def plan(claim: Claim) -> Iterator[WrittenBatch]:
        for batch in digests.iter_plan(
            app.sessions,
            args.now,
            report,
            window=args.window,
            domain=args.domain,
            synonyms=args.synonyms,
            ranges=ranges,
            claim=claim,
            stop=stop,
            loaded=loaded,
        ):
            on_event("planned", len(batch.rows))
            yield batch

    with collector_for_sending():
        return sender.run(plan), report


def _child(
    settings: Settings,
    number: int,
    parent: int,
    counts: dict[str, Synchronized[int]],
    reports: multiprocessing.Queue[tuple[int, SendReport, PlanReport | None]],
    args: PlanArgs | None,
    ranges: IdRanges | None,
    index: tuple[IndexNotice, Connection] | None,
) -> None:
    _die_with_parent(parent)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def count(kind: str, n: int) -> None:
        counter = counts.get("done" if kind != "planned" else kind)
        if counter is not None and kind != "retry":
            with counter.get_lock():
                counter.value += n

    app = App(settings)
    try:
        sender = Sender(app, on_event=count, stop=stop)
        loaded = None
        if index is not None:
            meanwhile = _warm_up(sender, app, args) if args is not None else None
            loaded = _received(*index, stop, parent, meanwhile)
        report, planned = _work(app, args, ranges, count, stop, loaded, sender)
    finally:
        app.close()
    reports.put((number, report, planned))
    reports.close()
    reports.join_thread()  # the report is on its way before this process ends
    exit_quickly(0)


def _merge(into: SendReport, part: SendReport) -> None:
    into.sent += part.sent
    into.failed += part.failed
    into.retried += part.retried
    into.suppressed += part.suppressed
    into.released += part.released
    into.failures.extend(part.failures)
    if part.aborted and not into.aborted:
        into.aborted = part.aborted


def _merge_plan(into: PlanReport, part: PlanReport | None) -> None:
    if part is not None:
        into.subscribers += part.subscribers
        into.planned += part.planned
        into.quiet += part.quiet
        into.candidates = max(into.candidates, part.candidates)
        into.stopped = into.stopped or part.stopped


def drain(
    app: App,
    *,
    processes: int,
    plan: PlanArgs | None = None,
    on_event: Callable[[str, int], None] | None = None,
    stop: threading.Event | None = None,
) -> DrainReport:
    """Plan (with `plan`) and send this period's digests with `processes` processes (this one
    included), then anything else due; returns when the ledger has nothing left that is due
    or retrying, or when `stop` is set. `on_event` hears of digests planned ("planned") and
    of outcomes ("sent", "failed", "retry", "suppressed") as they happen, in all processes."""
    on_event = on_event or (lambda kind, n: None)
    stop = stop or threading.Event()
    settings = app.settings.replace(secret_key=app.secret_key)
    if processes <= 1:
        ranges = id_ranges(app) if plan is not None else None
        report, planned = _work(app, plan, ranges, on_event, stop)
        total_plan = PlanReport()
        _merge_plan(total_plan, planned)
        return DrainReport(report, [report.sent], plan=total_plan if plan else None)

    ctx = multiprocessing.get_context("spawn")  # no forked copies of engines or threads
    ranges = id_ranges(app, ctx, processes) if plan is not None else None
    reports: multiprocessing.Queue[tuple[int, SendReport, PlanReport | None]] = ctx.Queue()
    # The index, for the helpers (see _load_and_ship): a file each is given at its start.
    shipment = tempfile.TemporaryFile() if plan is not None else None  # noqa: SIM115 (closed below)
    shipped = Connection(os.dup(shipment.fileno())) if shipment is not None else None
    notices: list[IndexNotice] = [ctx.Queue() for _ in range(processes - 1)] if shipment else []
    counters = [
        {"done": ctx.Value("q", 0), "planned": ctx.Value("q", 0)} for _ in range(processes - 1)
    ]
    children = [
        ctx.Process(
            target=_child,
            args=(
                settings.replace(smtp_connections=connections_for(settings, processes, i + 1)),
                i + 1,
                os.getpid(),
                counters[i],
                reports,
                plan,
                ranges,
                (notices[i], shipped) if shipped is not None else None,
            ),
            name=f"newsletter-send-{i + 1}",
            daemon=True,
        )
        for i in range(processes - 1)
    ]
    seen = [{"done": 0, "planned": 0} for _ in counters]
    progress_done = threading.Event()

    def relay_once() -> None:
        """Children count what they finish; the parent's progress bar shows the sum."""
        for i, counts in enumerate(counters):
            for kind, counter in counts.items():
                value = int(counter.value)
                if value > seen[i][kind]:
                    on_event("sent" if kind == "done" else kind, value - seen[i][kind])
                    seen[i][kind] = value

    def relay_progress() -> None:
        while not progress_done.wait(0.2):
            relay_once()

    relay = threading.Thread(target=relay_progress, name="progress-relay", daemon=True)
    relay.start()

    def stop_children() -> None:
        stop.wait()
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)

    threading.Thread(target=stop_children, name="stop-relay", daemon=True).start()

    own = App(settings.replace(smtp_connections=connections_for(settings, processes, 0)))
    total = SendReport()
    total_plan = PlanReport()
    per_process = [0] * processes
    try:
        # Started last, right before the index is built: from here on they wait for it,
        # and `_load_and_ship` tells them whatever happens (or they see this process gone).
        for child in children:
            child.start()
        if shipped is not None:
            shipped.close()  # each helper has its own handle now
        loaded = None
        if plan is not None:
            assert shipment is not None
            loaded = _load_and_ship(own, plan, shipment, notices)
        part, planned = _work(own, plan, ranges, on_event, stop, loaded)
    finally:
        own.close()
        if shipment is not None:
            shipment.close()
    _merge(total, part)
    _merge_plan(total_plan, planned)
    per_process[0] = part.sent

    died = []
    # Reports first, then join: a child does not exit before its report has left its queue
    # buffer, so joining first could wait forever on a long list of failures.
    waiting_for = set(range(1, processes))
    while waiting_for:
        try:
            index, child_report, child_plan = reports.get(timeout=0.5)
        except queue.Empty:
            if not any(child.is_alive() for child in children):
                break
            continue
        _merge(total, child_report)
        _merge_plan(total_plan, child_plan)
        per_process[index] = child_report.sent
        waiting_for.discard(index)
    for child in children:
        child.join()
    for child in children:
        if child.exitcode != 0:
            died.append(f"{child.name} exited with {child.exitcode}")
    progress_done.set()
    relay.join()
    relay_once()  # what the last poll did not see yet
    if died and not stop.is_set():
        # Their claims carry dead pids on this host, so this pass takes them over at once;
        # planning again finds whoever they had not planned yet.
        log.warning("%s; finishing their work here", "; ".join(died))
        last, replanned = _work(app, plan, id_ranges(app) if plan else None, on_event, stop)
        _merge(total, last)
        _merge_plan(total_plan, replanned)
        per_process[0] += last.sent
    return DrainReport(total, per_process, died, total_plan if plan else None)
