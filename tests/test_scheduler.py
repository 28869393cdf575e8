"""When digests are planned, under a controlled clock: the plan job is driven with explicit
`now` values (no sleeping), on SQLite and PostgreSQL. Expected send times are written out in
UTC by hand, so a time zone or DST mistake in the code cannot hide in the expectation."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

import pytest
from conftest import make_settings
from sqlalchemy import func, select

from newsletter import db, digests, subscribers
from newsletter.app import App
from newsletter.models import Delivery, DeliveryItem, Entry, Feed, Subscriber
from newsletter.scheduler import Scheduler, plan_due

STEP = timedelta(minutes=30)
_guids = count()


@pytest.fixture
def app(db_url: str) -> Iterator[App]:
    instance = App(make_settings(db_url, 1))  # nothing is sent here
    instance.init()
    with db.transaction(instance.sessions) as session:
        session.add(Feed(url="https://example.org/feed.xml", title="Example"))
    yield instance
    instance.close()


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def add_subscriber(app: App, email: str, timezone: str, hour: int, frequency: str) -> None:
    spec = subscribers.ProfileSpec.from_mapping(
        {
            "email": email,
            "keywords": ["diffusion"],
            "timezone": timezone,
            "send_hour": hour,
            "frequency": frequency,
        }
    )
    with db.transaction(app.sessions) as session:
        subscribers.upsert(session, spec)


def add_paper(app: App, at: datetime, title: str = "Diffusion models, again") -> None:
    with db.transaction(app.sessions) as session:
        feed_id = session.scalar(select(Feed.id))
        n = next(_guids)
        session.add(Entry(feed_id=feed_id, guid=f"paper-{n}", title=f"{title} {n}", fetched_at=at))


def deliveries(app: App) -> dict[str, list[str]]:
    with app.session() as session:
        rows = session.execute(
            select(Subscriber.email, Delivery.period).join(Subscriber).order_by(Delivery.id)
        )
        out: dict[str, list[str]] = {}
        for email, period in rows:
            out.setdefault(email, []).append(period)
        return out


def simulate(app: App, due: digests.Due, start: datetime, end: datetime) -> dict[str, list[str]]:
    """Run the plan job every STEP from start to end, with a new paper before each run, and
    note when each digest was planned: {email: ["period@HH:MM UTC day", ...]}."""
    planned: dict[str, list[str]] = {}
    with app.session() as session:
        seen = session.scalar(select(func.max(Delivery.id))) or 0
    now = start
    while now <= end:
        add_paper(app, now - timedelta(seconds=1))
        plan_due(app, due, now)
        with app.session() as session:
            rows = session.execute(
                select(Delivery.id, Subscriber.email, Delivery.period)
                .join(Subscriber)
                .where(Delivery.id > seen)
                .order_by(Delivery.id)
            ).all()
        for delivery_id, email, period in rows:
            planned.setdefault(email, []).append(f"{period}@{now:%m-%d %H:%M}")
            seen = max(seen, delivery_id)
        now += STEP
    return planned


def test_each_reader_at_their_hour_across_spring_dst(app: App) -> None:
    add_subscriber(app, "berlin@example.org", "Europe/Berlin", 7, "daily")
    add_subscriber(app, "berlin-2am@example.org", "Europe/Berlin", 2, "daily")
    add_subscriber(app, "ny@example.org", "America/New_York", 7, "daily")
    add_subscriber(app, "tokyo@example.org", "Asia/Tokyo", 7, "daily")
    add_subscriber(app, "sydney@example.org", "Australia/Sydney", 7, "daily")
    add_subscriber(app, "tokyo-weekly@example.org", "Asia/Tokyo", 9, "weekly")
    due = digests.Due(timedelta(hours=24))
    got = simulate(app, due, utc("2026-03-27 12:00"), utc("2026-03-30 12:00"))
    assert got == {
        # CET (UTC+1) until 2026-03-29 01:00 UTC, CEST (UTC+2) after
        # (the 03-27 sends were hours before the service started: caught up at once)
        "berlin@example.org": [
            "2026-03-27@03-27 12:00",
            "2026-03-28@03-28 06:00",
            "2026-03-29@03-29 05:00",
            "2026-03-30@03-30 05:00",
        ],
        # 02:00 does not exist on 03-29: sent when the clocks jump (01:00 UTC = 03:00 CEST)
        "berlin-2am@example.org": [
            "2026-03-27@03-27 12:00",
            "2026-03-28@03-28 01:00",
            "2026-03-29@03-29 01:00",
            "2026-03-30@03-30 00:00",
        ],
        # EDT (UTC-4)
        "ny@example.org": [
            "2026-03-27@03-27 12:00",
            "2026-03-28@03-28 11:00",
            "2026-03-29@03-29 11:00",
            "2026-03-30@03-30 11:00",
        ],
        # JST (UTC+9): 07:00 is 22:00 UTC the day before
        "tokyo@example.org": [
            "2026-03-27@03-27 12:00",
            "2026-03-28@03-27 22:00",
            "2026-03-29@03-28 22:00",
            "2026-03-30@03-29 22:00",
        ],
        # AEDT (UTC+11) until 2026-04-05: 07:00 is 20:00 UTC the day before
        "sydney@example.org": [
            "2026-03-27@03-27 12:00",
            "2026-03-28@03-27 20:00",
            "2026-03-29@03-28 20:00",
            "2026-03-30@03-29 20:00",
        ],
        # Mondays 09:00 JST = 00:00 UTC; week 13's Monday was days before the start: dropped
        "tokyo-weekly@example.org": ["2026-W14@03-30 00:00"],
    }


def test_autumn_dst_in_new_york_and_sydney_spring(app: App) -> None:
    add_subscriber(app, "ny@example.org", "America/New_York", 7, "daily")
    add_subscriber(app, "ny-1am@example.org", "America/New_York", 1, "daily")
    add_subscriber(app, "sydney@example.org", "Australia/Sydney", 7, "daily")
    due = digests.Due(timedelta(hours=24))
    # the first run catches up the current periods; what matters comes after
    simulate(app, due, utc("2026-10-30 13:00"), utc("2026-10-30 13:00"))
    got = simulate(app, due, utc("2026-10-30 13:30"), utc("2026-11-02 13:00"))
    assert got == {
        # EDT (UTC-4) until 2026-11-01 06:00 UTC, EST (UTC-5) after
        "ny@example.org": [
            "2026-10-31@10-31 11:00",
            "2026-11-01@11-01 12:00",
            "2026-11-02@11-02 12:00",
        ],
        # 01:00 happens twice on 11-01 (05:00 and 06:00 UTC): one digest, at the first
        "ny-1am@example.org": [
            "2026-10-31@10-31 05:00",
            "2026-11-01@11-01 05:00",
            "2026-11-02@11-02 06:00",
        ],
        # Sydney moved to AEDT (UTC+11) on 2026-10-04: 20:00 UTC the day before
        "sydney@example.org": [
            "2026-10-31@10-30 20:00",
            "2026-11-01@10-31 20:00",
            "2026-11-02@11-01 20:00",
        ],
    }


def test_one_digest_after_downtime_and_stale_periods_dropped(app: App) -> None:
    add_subscriber(app, "berlin@example.org", "Europe/Berlin", 7, "daily")
    due = digests.Due(timedelta(hours=24))
    add_paper(app, utc("2026-03-02 05:00"))
    assert plan_due(app, due, utc("2026-03-02 06:30")).planned == 1
    # Down for three days; papers kept arriving (fetched by a separate fetcher, say).
    for day in ("2026-03-03", "2026-03-04", "2026-03-05"):
        add_paper(app, utc(f"{day} 03:00"))
    report = plan_due(app, due, utc("2026-03-05 09:00"))
    assert report.planned == 1, "one digest for the current period, not one per missed day"
    assert deliveries(app) == {"berlin@example.org": ["2026-03-02", "2026-03-05"]}
    with app.session() as session:
        latest = session.scalar(select(func.max(Delivery.id)))
        items = session.scalar(select(func.count()).where(DeliveryItem.delivery_id == latest))
    assert items == 3, "the catch-up digest carries the papers of the missed days"
    assert plan_due(app, due, utc("2026-03-05 09:01")).planned == 0

    # With catch_up_hours=6, a period whose send time (06:00 UTC) is 8 hours past is dropped
    # and the reader gets the next one at its time instead.
    strict = digests.Due(timedelta(hours=6))
    add_paper(app, utc("2026-03-06 03:00"))
    assert plan_due(app, strict, utc("2026-03-06 14:00")).planned == 0
    assert plan_due(app, strict, utc("2026-03-07 05:59")).planned == 0
    assert plan_due(app, strict, utc("2026-03-07 06:00")).planned == 1
    assert deliveries(app)["berlin@example.org"] == ["2026-03-02", "2026-03-05", "2026-03-07"]


def test_readers_with_nothing_new_are_not_matched_every_minute(app: App) -> None:
    add_subscriber(app, "ada@example.org", "UTC", 7, "daily")
    due = digests.Due(timedelta(hours=24))
    add_paper(app, utc("2026-05-04 01:00"), title="Quantum error correction")
    first = plan_due(app, due, utc("2026-05-04 07:00"))
    assert (first.subscribers, first.planned, first.quiet) == (1, 0, 0)
    again = plan_due(app, due, utc("2026-05-04 07:01"))
    assert (again.planned, again.quiet, again.candidates) == (0, 1, 0), (
        "nothing new since: skipped without loading the papers"
    )
    add_paper(app, utc("2026-05-04 07:30"))  # a matching paper arrives later that day
    later = plan_due(app, due, utc("2026-05-04 08:00"))
    assert later.planned == 1 and later.quiet == 0


def test_plan_stops_between_batches(app: App) -> None:
    add_subscriber(app, "ada@example.org", "UTC", 0, "daily")
    add_paper(app, utc("2026-05-04 01:00"))
    stop = threading.Event()
    stop.set()
    report = plan_due(app, digests.Due(timedelta(hours=24)), utc("2026-05-04 02:00"), stop=stop)
    assert report.stopped and report.planned == 0
    assert deliveries(app) == {}


def test_jobs_are_configured_on_purpose(app: App, tmp_path: Path) -> None:
    scheduler = Scheduler(app)
    built = scheduler._build(threading.Event())
    jobs = {job.id: job for job in built.get_jobs()}
    assert set(jobs) == {"fetch", "plan"}
    for job in jobs.values():
        assert job.coalesce is True
        assert job.misfire_grace_time is None
        assert job.max_instances == 1
    assert str(jobs["plan"].trigger).startswith("cron[second='0'")
    assert jobs["fetch"].trigger.interval == timedelta(minutes=60)
    assert jobs["fetch"].trigger.jitter == 300
