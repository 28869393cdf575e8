"""Job-run bookkeeping: one `job_runs` row per job (fetch, plan, send) saying when it last
ran, whether that worked and how long it took, for /metrics, /healthz and `newsletter status`.

A job never dies of its own failure: the error is logged once, with the run id, and recorded
on the job's row; the next run starts afresh. Failing to write the bookkeeping itself (the
database is away) is logged and does not stop the job either.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from newsletter.app import App
from newsletter.db import transaction
from newsletter.logs import run_context
from newsletter.models import JobRun, utcnow

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What one run did: the job fills in `counts`, which end up in the closing log line."""

    job: str
    run_id: str = field(default_factory=lambda: secrets.token_hex(6))
    started_at: datetime = field(default_factory=utcnow)
    counts: dict[str, int | float | str] = field(default_factory=dict)
    ok: bool = True
    error: str | None = None
    seconds: float = 0.0

    def fail(self, error: str) -> None:
        """A failure the job understood (no traceback worth logging)."""
        self.ok = False
        self.error = error


def _started(session: Session, run: Run) -> None:
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(JobRun).values(
        name=run.job, run_id=run.run_id, last_started_at=run.started_at, runs=1, failures=0
    )
    # Several workers share the "send" row: the increment happens in the database.
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={
                "run_id": run.run_id,
                "last_started_at": run.started_at,
                "runs": JobRun.runs + 1,
            },
        )
    )


def _finished(session: Session, run: Run, now: datetime) -> None:
    values: dict[str, object] = {
        "last_finished_at": now,
        "last_duration_seconds": run.seconds,
        "last_error": run.error,
    }
    if run.ok:
        values["last_success_at"] = now
    else:
        values["failures"] = JobRun.failures + 1
    session.execute(update(JobRun).where(JobRun.name == run.job).values(**values))


def _bookkeep(app: App, write: Callable[[Session], None], what: str) -> None:
    try:
        with transaction(app.sessions) as session:
            write(session)
    except Exception as exc:
        log.warning("could not record the %s of the run in job_runs: %s", what, exc)


def run_job(app: App, job: str, body: Callable[[Run], None]) -> Run:
    """Run `body` as one recorded, logged run of `job`; returns the run, failed or not."""
    run = Run(job)
    with run_context(job, run.run_id):
        _bookkeep(app, lambda s: _started(s, run), "start")
        began = time.monotonic()
        try:
            body(run)
        except Exception as exc:
            run.ok = False
            run.error = f"{type(exc).__name__}: {exc}"[:2000]
            log.exception("%s run failed", job)
        run.seconds = round(time.monotonic() - began, 3)
        _bookkeep(app, lambda s: _finished(s, run, utcnow()), "end")
        summary = ", ".join(f"{k}={v}" for k, v in run.counts.items())
        if run.ok:
            log.info("%s run done in %.2fs: %s", job, run.seconds, summary or "nothing to do")
        else:
            log.warning("%s run failed after %.2fs: %s (%s)", job, run.seconds, run.error, summary)
    return run


def last_runs(session: Session) -> list[JobRun]:
    return list(session.scalars(select(JobRun).order_by(JobRun.name)))
