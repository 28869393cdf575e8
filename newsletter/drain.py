"""`newsletter send` on every core: several processes drain the same ledger side by side.

Rendering and SMTP are CPU-bound Python, so one process tops out at one core whatever its
threads do. The ledger already makes concurrent senders safe (an atomic claim with a lease, an
outcome committed before a connection takes its next message), so using more cores is only a
matter of starting more `Sender`s in processes of their own:

- ``smtp_connections`` stays the total the operator allows towards the server (servers limit
  connections per client): it is split between the processes, so a crash still leaves at most
  that many messages accepted but unrecorded;
- children die with the parent (``PR_SET_PDEATHSIG``): a `send` killed by SIGKILL takes its
  helpers with it, and a restart finds nothing still running behind its back;
- SIGINT/SIGTERM stop every process the graceful way (finish or hand back what is in flight);
- a child that dies anyway leaves its rows claimed under its pid; the parent takes them over at
  once (claims by dead local pids need no lease to run out) in a last pass.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType

from newsletter.app import App
from newsletter.config import Settings
from newsletter.sending import Sender, SendReport

log = logging.getLogger(__name__)

# Below this many digests per process, starting another interpreter costs more than it saves.
MIN_PER_PROCESS = 500
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


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: a killed parent's helpers finish their rows
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _child(
    settings: Settings,
    index: int,
    parent: int,
    done: Synchronized[int],
    reports: multiprocessing.Queue[tuple[int, SendReport]],
    planned: EventType,
) -> None:
    _die_with_parent(parent)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def count(kind: str, n: int) -> None:
        if kind != "retry":
            with done.get_lock():
                done.value += n

    app = App(settings)
    try:
        sender = Sender(app, on_event=count, stop=stop, more_coming=lambda: not planned.is_set())
        report = sender.run()
    finally:
        app.close()
    reports.put((index, report))


def _merge(into: SendReport, part: SendReport) -> None:
    into.sent += part.sent
    into.failed += part.failed
    into.retried += part.retried
    into.suppressed += part.suppressed
    into.released += part.released
    into.failures.extend(part.failures)
    if part.aborted and not into.aborted:
        into.aborted = part.aborted


def drain(
    app: App,
    *,
    processes: int,
    plan: Callable[[], None] = lambda: None,
    on_event: Callable[[str, int], None] | None = None,
    stop: threading.Event | None = None,
) -> DrainReport:
    """Send everything due with `processes` processes (this one included); returns when the
    ledger has nothing left that is due or retrying, or when `stop` is set.

    `plan` writes the ledger rows (`digests.plan_period`). It runs here while the other
    processes already send what it has committed (it commits a thousand readers at a time),
    so planning and sending overlap instead of following each other."""
    on_event = on_event or (lambda kind, n: None)
    stop = stop or threading.Event()
    settings = app.settings.replace(secret_key=app.secret_key)
    if processes <= 1:
        plan()
        report = Sender(app, on_event=on_event, stop=stop).run()
        return DrainReport(report, [report.sent])

    ctx = multiprocessing.get_context("spawn")  # no forked copies of engines or threads
    reports: multiprocessing.Queue[tuple[int, SendReport]] = ctx.Queue()
    planned = ctx.Event()
    counters = [ctx.Value("q", 0) for _ in range(processes - 1)]
    children = [
        ctx.Process(
            target=_child,
            args=(
                settings.replace(smtp_connections=connections_for(settings, processes, i + 1)),
                i + 1,
                os.getpid(),
                counters[i],
                reports,
                planned,
            ),
            name=f"newsletter-send-{i + 1}",
            daemon=True,
        )
        for i in range(processes - 1)
    ]
    for child in children:
        child.start()

    seen = [0] * len(counters)
    progress_done = threading.Event()

    def relay_once() -> None:
        """Children count what they finish; the parent's progress bar shows the sum."""
        for i, counter in enumerate(counters):
            value = int(counter.value)
            if value > seen[i]:
                on_event("sent", value - seen[i])
                seen[i] = value

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
    per_process = [0] * processes
    try:
        plan()
    finally:
        planned.set()  # also on failure: the helpers finish what was planned, then stop
    try:
        part = Sender(own, on_event=on_event, stop=stop).run()
    finally:
        own.close()
    _merge(total, part)
    per_process[0] = part.sent

    died = []
    # Reports first, then join: a child does not exit before its report has left its queue
    # buffer, so joining first could wait forever on a long list of failures.
    waiting_for = set(range(1, processes))
    while waiting_for:
        try:
            index, child_report = reports.get(timeout=0.5)
        except queue.Empty:
            if not any(child.is_alive() for child in children):
                break
            continue
        _merge(total, child_report)
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
        # Their claims carry dead pids on this host, so this pass takes them over at once.
        log.warning("%s; finishing their deliveries here", "; ".join(died))
        last = Sender(app, on_event=on_event, stop=stop).run()
        _merge(total, last)
        per_process[0] += last.sent
    return DrainReport(total, per_process, died)
