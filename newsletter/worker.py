"""A worker drains the delivery queue until it is told to stop.

Each pass is one `sending.Sender` run, so a worker keeps every guarantee of `newsletter send`
(claim before sending, lease and heartbeat, outcome committed before the next message). Any
number of workers, in any number of processes and machines, share one queue on PostgreSQL.

Stopping is graceful: the current run stops claiming, hands back what it claimed but has not
sent, and waits for the messages already on the wire to be recorded.
"""

from __future__ import annotations

import logging
import threading

from newsletter.app import App
from newsletter.jobs import Run, run_job
from newsletter.models import utcnow
from newsletter.sending import Sender, has_due, make_worker_id

log = logging.getLogger(__name__)


class Worker:
    """`run` is a thread's body; `stop` and `wake` may be called from any thread."""

    def __init__(self, app: App, *, host: str | None = None, poll: float | None = None) -> None:
        self.app = app
        self.host = host
        self.poll = app.settings.worker_poll_seconds if poll is None else poll
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._sender: Sender | None = None

    def wake(self) -> None:
        """Look at the queue now rather than at the next poll (the planner just added work)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            if self._sender is not None:
                self._sender.stop.set()

    def run(self) -> None:
        # The id is made in the thread that sends, so two workers in one process differ.
        worker_id = make_worker_id(self.host)
        log.info("worker %s started; looking for work every %gs", worker_id, self.poll)
        unreachable = False  # said once per outage, not at every poll
        while not self._stop.is_set():
            self._wake.clear()
            try:
                with self.app.session() as session:
                    due = has_due(session, utcnow())
                if unreachable:
                    log.info("the database is back")
                unreachable = False
            except Exception as exc:
                if not unreachable:
                    log.warning("cannot look at the queue: %s", str(exc).splitlines()[0])
                unreachable = True
                due = False
            if due:
                run = run_job(self.app, "send", lambda r: self._send(r, worker_id))
                if run.ok:
                    continue  # more may have come due meanwhile
            self._wake.wait(self.poll)
        log.info("worker %s stopped", worker_id)

    def _send(self, run: Run, worker_id: str) -> None:
        sender = Sender(self.app, worker_id=worker_id)
        with self._lock:
            self._sender = sender
            if self._stop.is_set():
                sender.stop.set()
        try:
            report = sender.run()
        finally:
            with self._lock:
                self._sender = None
        run.counts.update(
            sent=report.sent,
            failed=report.failed,
            retried=report.retried,
            suppressed=report.suppressed,
            handed_back=report.released,
        )
        if report.aborted:
            run.fail(report.aborted)
