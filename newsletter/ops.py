"""What an operator (or their monitoring) sees of a running service: ``/healthz``,
``/metrics``, and the snapshot `newsletter status` prints.

Metrics are read from the database at scrape time by a custom collector, not counted in
process: with several workers in several processes, only the ledger knows the totals, and
any one process can report them.

/healthz answers with which checks failed but not why: the details (host names, server
replies) go to the log, since the web app may face the internet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from newsletter import db
from newsletter.app import App
from newsletter.mailer import probe
from newsletter.models import Delivery, DeliveryStatus, Feed, JobRun

log = logging.getLogger(__name__)

HEALTH_CACHE_SECONDS = 5.0
HEALTH_SMTP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class JobState:
    name: str
    runs: int
    failures: int
    last_started_at: datetime | None
    last_success_at: datetime | None
    last_duration_seconds: float | None
    last_error: str | None
    run_id: str | None


@dataclass(frozen=True, slots=True)
class FeedProblem:
    url: str
    failures: int
    error: str
    next_fetch_at: datetime | None


@dataclass
class Snapshot:
    deliveries: dict[str, int] = field(default_factory=dict)  # by status, every status present
    retries: int = 0
    jobs: list[JobState] = field(default_factory=list)
    failing_feeds: list[FeedProblem] = field(default_factory=list)

    @property
    def queue_depth(self) -> int:
        return self.deliveries[DeliveryStatus.PENDING] + self.deliveries[DeliveryStatus.SENDING]


def snapshot(session: Session) -> Snapshot:
    """Three queries; the deliveries one is a single pass grouped by status."""
    snap = Snapshot(deliveries={s.value: 0 for s in DeliveryStatus})
    retries = func.sum(case((Delivery.attempts > 1, Delivery.attempts - 1), else_=0))
    for status, count, retried in session.execute(
        select(Delivery.status, func.count(), retries).group_by(Delivery.status)
    ):
        snap.deliveries[DeliveryStatus(status).value] = int(count)
        snap.retries += int(retried or 0)
    snap.jobs = [
        JobState(
            j.name,
            j.runs,
            j.failures,
            j.last_started_at,
            j.last_success_at,
            j.last_duration_seconds,
            j.last_error,
            j.run_id,
        )
        for j in session.scalars(select(JobRun).order_by(JobRun.name))
    ]
    snap.failing_feeds = [
        FeedProblem(f.url, f.consecutive_failures, f.last_error or "", f.next_fetch_at)
        for f in session.scalars(
            select(Feed).where(Feed.enabled, Feed.consecutive_failures > 0).order_by(Feed.url)
        )
    ]
    return snap


class LedgerCollector(Collector):
    """Reads the ledger, job runs and feeds on every scrape."""

    def __init__(self, app: App, leader: Callable[[], bool] | None) -> None:
        self.app = app
        self.leader = leader

    def describe(self) -> list[Metric]:
        return []  # no database query at registration time

    def collect(self) -> Iterator[Metric]:
        leader = GaugeMetricFamily(
            "newsletter_scheduler_leader", "1 if this process runs the scheduler (holds the lock)"
        )
        leader.add_metric([], 1.0 if self.leader is not None and self.leader() else 0.0)
        yield leader
        up = GaugeMetricFamily("newsletter_database_up", "1 if the database could be read")
        try:
            with self.app.session() as session:
                snap = snapshot(session)
        except Exception as exc:
            log.warning("metrics: cannot read the database: %s", str(exc).splitlines()[0])
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from _ledger_metrics(snap)


def _ledger_metrics(snap: Snapshot) -> Iterator[Metric]:
    d = snap.deliveries
    yield CounterMetricFamily(
        "newsletter_deliveries_sent", "Digests the SMTP server accepted", value=d["sent"]
    )
    yield CounterMetricFamily(
        "newsletter_deliveries_failed",
        "Digests given up on (5xx, or temporary failures past max_attempts)",
        value=d["failed"],
    )
    yield CounterMetricFamily(
        "newsletter_delivery_retries",
        "Attempts repeated after a temporary failure (4xx, timeout, dropped connection)",
        value=snap.retries,
    )
    yield GaugeMetricFamily(
        "newsletter_queue_depth", "Deliveries pending or being sent", value=snap.queue_depth
    )
    by_status = GaugeMetricFamily(
        "newsletter_deliveries", "Deliveries in the ledger by status", labels=["status"]
    )
    for status, count in d.items():
        by_status.add_metric([status], count)
    yield by_status
    yield GaugeMetricFamily(
        "newsletter_feeds_failing",
        "Enabled feeds whose last fetch failed",
        value=len(snap.failing_feeds),
    )
    feed_failures = GaugeMetricFamily(
        "newsletter_feed_consecutive_failures",
        "Failed fetches in a row, for feeds that are failing",
        labels=["feed"],
    )
    for feed in snap.failing_feeds:
        feed_failures.add_metric([feed.url], feed.failures)
    yield feed_failures
    success = GaugeMetricFamily(
        "newsletter_job_last_success_timestamp_seconds",
        "When each job last finished without error (unix time)",
        labels=["job"],
    )
    duration = GaugeMetricFamily(
        "newsletter_job_last_duration_seconds", "How long each job's last run took", labels=["job"]
    )
    runs = CounterMetricFamily("newsletter_job_runs", "Runs of each job", labels=["job"])
    failures = CounterMetricFamily(
        "newsletter_job_failures", "Failed runs of each job", labels=["job"]
    )
    for job in snap.jobs:
        if job.last_success_at is not None:
            success.add_metric([job.name], job.last_success_at.timestamp())
        if job.last_duration_seconds is not None:
            duration.add_metric([job.name], job.last_duration_seconds)
        runs.add_metric([job.name], job.runs)
        failures.add_metric([job.name], job.failures)
    yield from (success, duration, runs, failures)


class HealthCheck:
    """Database (reachable, schema current) and SMTP (reachable, login accepted). Results
    are shared for a few seconds and only one check runs at a time, so a burst of probes
    cannot pile up connections to a server that is already struggling."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._last: tuple[float, dict[str, dict[str, object]]] | None = None

    def _database(self) -> None:
        db.check_ready(self.app.engine)

    def _smtp(self) -> None:
        settings = self.app.settings
        timeout = min(settings.smtp_timeout, HEALTH_SMTP_TIMEOUT)
        probe(settings.replace(smtp_timeout=timeout))

    def run(self) -> dict[str, dict[str, object]]:
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < HEALTH_CACHE_SECONDS:
                return self._last[1]
            checks: dict[str, dict[str, object]] = {}
            for name, check in (("database", self._database), ("smtp", self._smtp)):
                began = time.monotonic()
                try:
                    check()
                    checks[name] = {"ok": True}
                except Exception as exc:
                    log.warning("health check %s failed: %s", name, str(exc).splitlines()[0])
                    checks[name] = {"ok": False, "error": type(exc).__name__}
                checks[name]["ms"] = round((time.monotonic() - began) * 1000, 1)
            self._last = (time.monotonic(), checks)
            return checks

    def endpoint(self, request: Request) -> Response:
        checks = self.run()
        ok = all(c["ok"] for c in checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "fail", "checks": checks}, status_code=200 if ok else 503
        )


def ops_routes(app: App, *, leader: Callable[[], bool] | None = None) -> list[BaseRoute]:
    """/healthz and /metrics, for whichever Starlette app serves them. `leader` says whether
    this process runs the scheduler (omitted where it never does, e.g. the web role)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(app, leader))
    health = HealthCheck(app)

    def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/healthz", health.endpoint, methods=["GET", "HEAD"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
