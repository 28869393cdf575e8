"""The periodic jobs, fired by APScheduler 3 while this process leads (see `leader`):

- ``fetch`` every `fetch_interval_minutes`, with jitter so that many installations do not hit
  arXiv in the same second. Only feeds that are due are fetched: a failing feed backs off
  (ingest records the failure and when to try again) and the others keep going.
- ``plan`` every minute, on the minute: plans the digest of everyone whose own send time in
  their current period has passed and who has none yet. Workers send what it plans.

Catching up after downtime is the ledger's job, not APScheduler's: jobs live in memory, so a
restart does not replay missed runs; the first plan run after it finds everyone whose send
time passed (within `catch_up_hours`) without a digest, and plans one each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.pool import (
    ThreadPoolExecutor,
)
from apscheduler.schedulers.background import (
    BackgroundScheduler,
)
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import select

from newsletter import digests, ingest
from newsletter.app import App
from newsletter.jobs import Run, run_job
from newsletter.leader import Leadership, leadership_for
from newsletter.models import JobRun, utcnow
from newsletter.render import Renderer

log = logging.getLogger(__name__)

STANDBY_POLL_SECONDS = 3.0


class _Stopping(Exception):
    """Raised from the per-feed callback to leave fetch_all between two feeds."""


def plan_due(
    app: App, due: digests.Due, now: datetime, *, stop: threading.Event | None = None
) -> digests.PlanReport:
    """One plan run at `now`: what the minute job does, and what tests drive with a clock."""
    settings = app.settings
    return digests.plan_period(
        app.sessions,
        now,
        window=timedelta(days=settings.entry_window_days),
        domain=Renderer(settings).domain,
        synonyms=settings.synonyms,
        due=due,
        stop=stop,
    )


class Scheduler:
    """Leads when it can, stands by when it cannot. `run` is a thread's body."""

    def __init__(
        self,
        app: App,
        *,
        leadership: Leadership | None = None,
        standby_poll: float = STANDBY_POLL_SECONDS,
        on_planned: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.settings = app.settings
        self.leadership = leadership or leadership_for(app.engine, self.settings.database_url)
        self.standby_poll = standby_poll
        self.on_planned = on_planned
        self.due = digests.Due(timedelta(hours=self.settings.catch_up_hours))
        self._stop = threading.Event()
        self._term = threading.Event()  # set when this leadership term ends

    @property
    def leading(self) -> bool:
        return self.leadership.held

    def stop(self) -> None:
        self._stop.set()
        self._term.set()

    def run(self) -> None:
        waiting_said = False
        try:
            while not self._stop.is_set():
                if self.leadership.acquire():
                    waiting_said = False
                    log.info("this process leads: the scheduler runs here")
                    self._lead()
                elif not waiting_said:
                    log.info(
                        "standing by: another process runs the scheduler; trying every %gs",
                        self.standby_poll,
                    )
                    waiting_said = True
                self._stop.wait(self.standby_poll)
        finally:
            self.leadership.release()

    def _lead(self) -> None:
        term = self._term = threading.Event()
        if self._stop.is_set():
            return
        scheduler = self._build(term)
        scheduler.start()
        try:
            while not self._stop.wait(self.standby_poll):
                if not self.leadership.check():
                    log.warning("no longer the scheduler leader; standing by")
                    break
        finally:
            term.set()  # running jobs stop at their next batch or feed
            scheduler.shutdown(wait=True)

    def _build(self, term: threading.Event) -> Any:
        settings = self.settings
        interval = timedelta(minutes=settings.fetch_interval_minutes)
        scheduler = BackgroundScheduler(
            timezone=UTC, executors={"default": ThreadPoolExecutor(max_workers=2)}
        )
        # Both jobs: coalesce=True, because runs missed while the process was stalled or
        # suspended are worth one run, not a burst; misfire_grace_time=None, because a late
        # run is as good as a timely one (plan reads what is due from the ledger, fetch only
        # takes due feeds), and what is too old to send is decided by catch_up_hours, not
        # by how late APScheduler woke up. max_instances=1: a slow run is never overlapped
        # by the next one; that one is skipped instead.
        common: dict[str, Any] = {"coalesce": True, "misfire_grace_time": None, "max_instances": 1}
        scheduler.add_job(
            self.fetch,
            IntervalTrigger(
                seconds=interval.total_seconds(),
                jitter=min(300.0, interval.total_seconds() / 10),
                timezone=UTC,
            ),
            args=[term],
            id="fetch",
            name="fetch",
            next_run_time=self._first_fetch(interval),
            **common,
        )
        scheduler.add_job(
            self.plan,
            CronTrigger(second=0, timezone=UTC),
            args=[term],
            id="plan",
            name="plan",
            next_run_time=utcnow(),  # a new leader catches up at once
            **common,
        )
        return scheduler

    def _first_fetch(self, interval: timedelta) -> datetime:
        """One interval after the last fetch started, whichever process ran it: a restart or
        a change of leader does not fetch every feed again."""
        now = utcnow()
        try:
            with self.app.session() as session:
                last = session.scalar(select(JobRun.last_started_at).where(JobRun.name == "fetch"))
        except Exception:
            return now
        return now if last is None else max(now, last + interval)

    def fetch(self, term: threading.Event) -> Run:
        def body(run: Run) -> None:
            reports: list[ingest.FeedReport] = []

            def on_report(report: ingest.FeedReport) -> None:
                reports.append(report)
                if term.is_set():
                    raise _Stopping

            try:
                ingest.fetch_all(self.app, force=False, on_report=on_report)
            except _Stopping:
                run.counts["stopped"] = "early"
            run.counts["feeds"] = len(reports)
            run.counts["failed"] = sum(1 for r in reports if not r.ok)
            run.counts["new_papers"] = sum(r.new_entries for r in reports)

        return run_job(self.app, "fetch", body)

    def plan(self, term: threading.Event, now: datetime | None = None) -> Run:
        def body(run: Run) -> None:
            report = plan_due(self.app, self.due, now or utcnow(), stop=term)
            run.counts.update(
                due=report.subscribers,
                planned=report.planned,
                nothing_new=report.quiet,
                papers=report.candidates,
            )
            if report.stopped:
                run.counts["stopped"] = "early"
            if report.planned and self.on_planned is not None:
                self.on_planned()

        return run_job(self.app, "plan", body)
