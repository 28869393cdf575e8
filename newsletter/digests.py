"""Deciding what each subscriber gets this period, and writing it to the ledger before any mail
leaves.

Planning is separate from sending: a planned digest is a `Delivery` row plus its
`DeliveryItem` rows, committed together. After that, whatever happens to the process, the
period's digest for that person exists exactly once and its content is fixed, so a retry or
another worker sends the very same email (same Message-ID) and never a second one.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any, NamedTuple, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import (
    ColumnElement,
    Connection,
    CursorResult,
    Table,
    and_,
    exists,
    func,
    or_,
    select,
)
from sqlalchemy.orm import Session

from newsletter.matching import Doc, Hit, MatchIndex, Pick, Profile
from newsletter.models import (
    Delivery,
    DeliveryItem,
    DeliveryStatus,
    Entry,
    Frequency,
    Subscriber,
    SubscriberStatus,
)

log = logging.getLogger(__name__)

BATCH_SIZE = 1000
# Schedules (time zone, frequency) per query: keeps each OR list far below SQLite's limit on
# expression depth (1000), whatever the number of time zones.
GROUPS_PER_QUERY = 50


def period_for(frequency: Frequency, timezone: str, now: datetime) -> str:
    """The period is the subscriber's own local day (or ISO week), so "today's digest" means
    the same thing to the reader in Tokyo and in Berlin."""
    local = now.astimezone(ZoneInfo(timezone))
    if frequency is Frequency.WEEKLY:
        year, week, _ = local.isocalendar()
        return f"{year}-W{week:02d}"
    return local.date().isoformat()


def send_time(frequency: Frequency, timezone: str, send_hour: int, now: datetime) -> datetime:
    """When the digest of the period that `now` falls in is due, in UTC: the send hour on the
    reader's local day, or on the Monday of their ISO week for weekly readers. On the day the
    clocks skip that hour it is the moment they jump forward; on the day the hour happens
    twice, its first occurrence (so it is still sent once: the period is what is unique)."""
    zone = ZoneInfo(timezone)
    day = now.astimezone(zone).date()
    if frequency is Frequency.WEEKLY:
        day -= timedelta(days=day.weekday())
    return datetime.combine(day, time(send_hour), tzinfo=zone).astimezone(UTC)


def message_id(domain: str, subscriber_id: int, period: str) -> str:
    # Fixed at planning time: a resend after a crash carries the same Message-ID, so mail
    # clients that see both copies show one.
    return f"<digest.{period}.{subscriber_id}.{secrets.token_hex(6)}@{domain}>"


def in_window(now: datetime, window: timedelta) -> ColumnElement[bool]:
    """The entries a run may show: those seen within the window."""
    return Entry.fetched_at >= now - window


def load_index(
    session: Session,
    now: datetime,
    window: timedelta,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    *,
    highlights: bool = False,
) -> tuple[MatchIndex, dict[int, datetime]]:
    """Index the entries seen within the window once, for every subscriber to look up.
    `highlights`: the index will highlight the emails too (see `MatchIndex`)."""
    rows = session.execute(
        select(Entry.id, Entry.title, Entry.summary_text, Entry.published, Entry.fetched_at).where(
            in_window(now, window)
        )
    )
    docs = []
    for entry_id, title, summary, published, fetched_at in rows:
        docs.append(Doc(entry_id, title, summary, published or fetched_at))
    index = MatchIndex(docs, synonyms, highlights=highlights)
    return index, {d.id: d.published for d in docs if d.published}


class Reader(NamedTuple):
    """What planning reads of a subscriber: plain columns, not the ORM object (loading
    100,000 of those was a tenth of the planning time)."""

    id: int
    email: str
    keywords: list[str]
    exclude: list[str]
    max_items: int
    frequency: Frequency
    timezone: str
    updated_at: datetime

    @classmethod
    def of(cls, sub: Subscriber) -> Reader:
        return cls(*(getattr(sub, name) for name in cls._fields))


READER_COLUMNS = tuple(getattr(Subscriber, name) for name in Reader._fields)


def profile_of(sub: Reader) -> Profile:
    return Profile(tuple(sub.keywords), tuple(sub.exclude), sub.max_items)


@dataclass(frozen=True, slots=True)
class PlannedDigest:
    subscriber_id: int
    email: str
    period: str
    picks: tuple[Pick, ...]


class QuietMemo:
    """Who matched nothing in their current period, as of which newest paper and which
    version of their profile. The plan job runs every minute, and everyone whose send time
    has passed without a digest stays due until the period ends: without this, they would
    all be matched again every minute. They are matched again when a newer paper arrives or
    their profile changes."""

    def __init__(self) -> None:
        self._quiet: dict[int, tuple[str, int, datetime]] = {}

    def __len__(self) -> int:
        return len(self._quiet)

    def is_quiet(self, sub: Reader, period: str, newest_entry: int) -> bool:
        return self._quiet.get(sub.id) == (period, newest_entry, sub.updated_at)

    def note(self, sub: Reader, period: str, newest_entry: int) -> None:
        self._quiet[sub.id] = (period, newest_entry, sub.updated_at)


@dataclass
class Due:
    """Plan only subscribers whose send time in their current period has passed, and not
    longer than `catch_up` ago. After an outage that makes one digest for the current period
    (never one per missed day), and none for a period whose send time is so long past that
    its news would be stale. Keep one `Due` across runs: its memo is what keeps a run cheap."""

    catch_up: timedelta
    quiet: QuietMemo = field(default_factory=QuietMemo)


Schedule = tuple[str, Frequency]  # (time zone, frequency)
IdRange = tuple[int, int]  # subscriber ids from the first up to (not including) the second


def due_schedules(
    session: Session, now: datetime, catch_up: timedelta
) -> dict[tuple[str, Schedule], list[int]]:
    """(period, schedule) -> the send hours due now. Worked out once per distinct schedule
    (there are a few dozen, not one per subscriber), so the database does the filtering."""
    due: dict[tuple[str, Schedule], list[int]] = {}
    combos = session.execute(
        select(Subscriber.timezone, Subscriber.frequency, Subscriber.send_hour)
        .where(Subscriber.status == SubscriberStatus.ACTIVE)
        .distinct()
    )
    for timezone, frequency, hour in combos:
        try:
            at = send_time(frequency, timezone, hour, now)
            period = period_for(frequency, timezone, now)
        except (ZoneInfoNotFoundError, ValueError):
            log.warning("subscribers with time zone %r are skipped: unknown zone", timezone)
            continue
        if at <= now and now - at <= catch_up:
            due.setdefault((period, (timezone, frequency)), []).append(hour)
    return due


def _due_filters(
    schedules: Mapping[tuple[str, Schedule], Sequence[int]],
) -> list[ColumnElement[bool]]:
    """SQL conditions, a chunk of schedules each, for: due now and no digest for the period."""
    clauses = [
        and_(
            Subscriber.timezone == timezone,
            Subscriber.frequency == frequency,
            Subscriber.send_hour.in_(hours),
            ~exists().where(Delivery.subscriber_id == Subscriber.id, Delivery.period == period),
        )
        for (period, (timezone, frequency)), hours in sorted(schedules.items())
    ]
    return [
        or_(*clauses[i : i + GROUPS_PER_QUERY]) for i in range(0, len(clauses), GROUPS_PER_QUERY)
    ]


def _batches(
    session: Session,
    subscriber_ids: Sequence[int] | None,
    where: ColumnElement[bool] | None = None,
    ids: IdRange | None = None,
) -> Iterator[list[Reader]]:
    """Stream active subscribers in id order, a batch at a time, so memory stays flat."""
    last_id = 0 if ids is None else ids[0] - 1
    while True:
        query = (
            select(*READER_COLUMNS)
            .where(Subscriber.status == SubscriberStatus.ACTIVE, Subscriber.id > last_id)
            .order_by(Subscriber.id)
            .limit(BATCH_SIZE)
        )
        if ids is not None:
            query = query.where(Subscriber.id < ids[1])
        if subscriber_ids is not None:
            query = query.where(Subscriber.id.in_(subscriber_ids))
        if where is not None:
            query = query.where(where)
        batch = [Reader(*row) for row in session.execute(query)]
        if not batch:
            return
        last_id = batch[-1].id  # read now: the caller's rollback expires the rows
        yield batch
        if len(batch) < BATCH_SIZE:  # that was the last of them: no query to find nothing
            return


def plan_batch(
    session: Session,
    index: MatchIndex,
    batch: Sequence[Reader],
    now: datetime,
    *,
    min_entry_id: int = 0,
) -> list[PlannedDigest]:
    """Pure decisions for one batch, using two look-ups: who already has this period's
    digest, and which candidate papers each person was already sent. `min_entry_id` (the
    oldest candidate) keeps the second look-up to recent history, not years of it."""
    periods = {sub.id: period_for(sub.frequency, sub.timezone, now) for sub in batch}
    ids = list(periods)
    existing = {
        (sid, period)
        for sid, period in session.execute(
            select(Delivery.subscriber_id, Delivery.period).where(
                Delivery.subscriber_id.in_(ids), Delivery.period.in_(set(periods.values()))
            )
        )
    }
    sent: dict[int, set[int]] = {}
    for sid, entry_id in session.execute(
        select(DeliveryItem.subscriber_id, DeliveryItem.entry_id).where(
            DeliveryItem.subscriber_id.in_(ids), DeliveryItem.entry_id >= min_entry_id
        )
    ):
        sent.setdefault(sid, set()).add(entry_id)

    planned = []
    for sub in batch:
        period = periods[sub.id]
        if (sub.id, period) in existing:
            continue
        picks = index.match(profile_of(sub), exclude_ids=sent.get(sub.id, frozenset()))
        if picks:  # nobody gets an empty email
            planned.append(PlannedDigest(sub.id, sub.email, period, tuple(picks)))
    return planned


@dataclass(frozen=True, slots=True)
class Claim:
    """Who will send the rows being written: `newsletter send` writes its digests already
    claimed by itself (status ``sending``, with a lease), sends them straight from memory,
    and no other worker can take them meanwhile. Without one, rows are written ``pending``
    for any worker to claim."""

    worker: str
    lease: timedelta


@dataclass(frozen=True, slots=True)
class Written:
    """A planned digest as it went into the ledger."""

    delivery_id: int
    message_id: str
    planned: PlannedDigest


@dataclass
class WrittenBatch:
    """One committed batch of the plan. `exact`: every pick went in as an item row. When one
    was already there (another planner raced this one for the same paper and person) the
    ledger, not the plan in memory, says what the digest holds: read it from there."""

    rows: list[Written]
    exact: bool


def write_plan(
    session: Session, planned: Sequence[PlannedDigest], domain: str, claim: Claim | None = None
) -> WrittenBatch:
    """Insert ledger rows; a row another planner inserted first is skipped, with its items."""
    if not planned:
        return WrittenBatch([], True)
    now = datetime.now().astimezone()
    status, claimed_by, claimed_until = DeliveryStatus.PENDING, None, None
    if claim is not None:
        status, claimed_by, claimed_until = DeliveryStatus.SENDING, claim.worker, now + claim.lease
    connection = session.connection()
    # The values every row shares, as the driver takes them (each processed once).
    status_value = _bound(connection, "status", status)
    now_value = _bound(connection, "created_at", now)
    until_value = _bound(connection, "claimed_until", claimed_until)
    message_ids = {p.subscriber_id: message_id(domain, p.subscriber_id, p.period) for p in planned}
    rows = [
        (
            p.subscriber_id,
            p.period,
            status_value,
            0,
            now_value,
            message_ids[p.subscriber_id],
            now_value,
            claimed_by,
            until_value,
        )
        for p in planned
    ]
    inserted = {(sid, period): did for did, sid, period in _insert_deliveries(connection, rows)}
    written = []
    items = []
    for p in planned:
        delivery_id = inserted.get((p.subscriber_id, p.period))
        if delivery_id is None:
            continue
        written.append(Written(delivery_id, message_ids[p.subscriber_id], p))
        items += [
            (p.subscriber_id, pick.doc_id, delivery_id, rank, _hits_json(pick.hits))
            for rank, pick in enumerate(p.picks)
        ]
    stored = _insert_items(connection, items)
    return WrittenBatch(written, exact=stored == len(items))


# Columns as bulk inserts name them, with their PostgreSQL types (see `_insert_values`).
_DELIVERY_COLUMNS = (
    ("subscriber_id", "integer"),
    ("period", "text"),
    ("status", "text"),
    ("attempts", "integer"),
    ("next_attempt_at", "timestamp"),
    ("message_id", "text"),
    ("created_at", "timestamp"),
    ("claimed_by", "text"),
    ("claimed_until", "timestamp"),
)
_ITEM_COLUMNS = (
    ("subscriber_id", "integer"),
    ("entry_id", "integer"),
    ("delivery_id", "integer"),
    ("rank", "integer"),
    ("hits", "json"),
)


def _bound(connection: Connection, column: str, value: object) -> object:
    """`value` as the `deliveries` column's type hands it to the driver (a UTC timestamp,
    the status's stored name), for statements that bypass SQLAlchemy's per-row processing."""
    process = cast(Table, Delivery.__table__).c[column].type.bind_processor(connection.dialect)
    return process(value) if process is not None and value is not None else value


def _insert_deliveries(
    connection: Connection, rows: Sequence[tuple[object, ...]]
) -> list[tuple[int, int, str]]:
    """The new rows, RETURNING their ids; a row another planner inserted first is not
    returned."""
    return [
        cast(tuple[int, int, str], tuple(row))
        for result in _insert_values(
            connection,
            "deliveries",
            _DELIVERY_COLUMNS,
            rows,
            "ON CONFLICT (subscriber_id, period) DO NOTHING RETURNING id, subscriber_id, period",
        )
        for row in result
    ]


def _insert_items(connection: Connection, rows: Sequence[tuple[int, int, int, int, str]]) -> int:
    """The items (ten or so per digest), JSON already encoded. Returns how many rows went in
    (a row already there is skipped)."""
    results = _insert_values(
        connection,
        "delivery_items",
        _ITEM_COLUMNS,
        rows,
        "ON CONFLICT (subscriber_id, entry_id) DO NOTHING",
    )
    return sum(max(result.rowcount, 0) for result in results)


def _insert_values(
    connection: Connection,
    table: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[tuple[object, ...]],
    tail: str,
) -> Iterator[CursorResult[Any]]:
    """INSERT many rows a statement, parameters as the driver takes them (SQLAlchemy's
    per-row processing of them cost more than the insert). PostgreSQL gets one array per
    column (``SELECT * FROM unnest(…)``): a statement per row cost its server more than the
    rows, and a VALUES list of thousands of placeholders cost psycopg more to prepare than to
    send. SQLite gets a VALUES list, under its limit of 32,766 parameters a statement."""
    if not rows:
        return
    names = ", ".join(name for name, _ in columns)
    if connection.dialect.name == "postgresql":
        arrays = ", ".join(f"%s::{kind}[]" for _, kind in columns)
        sql = f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}) {tail}"
        for start in range(0, len(rows), 10_000):
            chunk = rows[start : start + 10_000]
            yield connection.exec_driver_sql(
                sql, tuple(_pg_array(column) for column in zip(*chunk, strict=True))
            )
        return
    row = "(" + ", ".join(["?"] * len(columns)) + ")"
    per_statement = 30_000 // len(columns)
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        sql = f"INSERT INTO {table} ({names}) VALUES {', '.join([row] * len(chunk))} {tail}"
        yield connection.exec_driver_sql(sql, tuple(value for r in chunk for value in r))


def _pg_array(values: tuple[object, ...]) -> object:
    """A column of ints or of strings as the text PostgreSQL reads an array from, made by
    `str.join`: psycopg's list dumper quotes element by element in Python, 5.6 µs for each
    item's hits, as much as the rest of planning the item. Anything else (None, dates) is
    left to psycopg."""
    kinds = set(map(type, values))
    if kinds == {int}:
        return "{" + ",".join(map(str, values)) + "}"
    if kinds == {str}:
        strings = cast("tuple[str, ...]", values)
        quoted = '","'.join(v.replace("\\", "\\\\").replace('"', '\\"') for v in strings)
        return '{"' + quoted + '"}'
    return list(values)


_HIT_JSON: dict[Hit, str] = {}


def _hits_json(hits: tuple[Hit, ...]) -> str:
    """A pick's hits as the ledger stores them: exactly what SQLAlchemy's JSON type writes
    (``json.dumps`` of a list of objects), put together from each hit's encoding. A run has
    a few thousand distinct hits and hundreds of thousands of combinations of them."""
    parts = []
    for hit in hits:
        found = _HIT_JSON.get(hit)
        if found is None:
            if len(_HIT_JSON) >= 50_000:
                _HIT_JSON.clear()
            found = _HIT_JSON[hit] = json.dumps(
                {"keyword": hit.keyword, "title": hit.in_title, "summary": hit.in_summary}
            )
        parts.append(found)
    return f"[{', '.join(parts)}]"


@dataclass
class PlanReport:
    subscribers: int = 0
    planned: int = 0
    candidates: int = 0
    quiet: int = 0  # due, but nothing new for them since they last matched nothing
    stopped: bool = False


def plan_period(
    session_factory: Callable[[], Session],
    now: datetime,
    *,
    window: timedelta,
    domain: str,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    subscriber_ids: Sequence[int] | None = None,
    dry_run: bool = False,
    on_planned: Callable[[PlannedDigest], None] | None = None,
    due: Due | None = None,
    stop: threading.Event | None = None,
) -> PlanReport:
    """Plan every active subscriber's digest for the period that `now` falls in (with `due`,
    only those whose send time has come). Each batch commits on its own, so a crash or a
    `stop` mid-way keeps what was planned and the next run plans the rest. (`send` plans
    batch by batch as it sends: `iter_plan`.)"""
    report = PlanReport()
    for _ in iter_plan(
        session_factory,
        now,
        report,
        window=window,
        domain=domain,
        synonyms=synonyms,
        subscriber_ids=subscriber_ids,
        dry_run=dry_run,
        on_planned=on_planned,
        due=due,
        stop=stop,
    ):
        pass
    return report


def iter_plan(
    session_factory: Callable[[], Session],
    now: datetime,
    report: PlanReport,
    *,
    window: timedelta,
    domain: str,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    subscriber_ids: Sequence[int] | None = None,
    dry_run: bool = False,
    on_planned: Callable[[PlannedDigest], None] | None = None,
    due: Due | None = None,
    stop: threading.Event | None = None,
    ranges: Iterable[IdRange] | None = None,
    claim: Claim | None = None,
    loaded: tuple[MatchIndex, int] | None = None,
) -> Iterator[WrittenBatch]:
    """`plan_period`, one committed batch at a time, as the caller asks for them: `send`
    plans a batch when its connections are about to run out of mail, in the thread that
    sends, so planning and sending share one core without taking turns at a lock. `report`
    is filled in as it goes. `ranges`: plan only subscribers with ids in these ranges, taken
    one at a time (the processes of a `send` share out the list this way). `claim`: write
    the rows claimed by it. `loaded`: the index (`load_for_plan`), if the caller has it."""

    def load(reader: Session) -> tuple[MatchIndex, int]:
        # A run that sends what it plans (`claim`) highlights its emails from this index.
        return load_for_plan(reader, now, window, synonyms, highlights=claim is not None)

    with session_factory() as reader:
        filters: list[ColumnElement[bool] | None] = [None]
        newest = 0
        if due is not None:
            filters = list(_due_filters(due_schedules(reader, now, due.catch_up)))
            newest = reader.scalar(select(func.max(Entry.id))) or 0
        if due is None and loaded is None:  # a due run may find nobody due: no index needed
            loaded = load(reader)
        if loaded is not None:
            report.candidates = len(loaded[0])
        for ids in [None] if ranges is None else ranges:
            for where in filters:
                for batch in _batches(reader, subscriber_ids, where, ids):
                    if stop is not None and stop.is_set():
                        report.stopped = True
                        return
                    report.subscribers += len(batch)
                    periods = {}
                    if due is not None:
                        periods = {s.id: period_for(s.frequency, s.timezone, now) for s in batch}
                        batch = [
                            s for s in batch if not due.quiet.is_quiet(s, periods[s.id], newest)
                        ]
                        report.quiet += len(periods) - len(batch)
                        if not batch:
                            continue
                    if loaded is None:
                        loaded = load(reader)
                        report.candidates = len(loaded[0])
                    index, min_entry_id = loaded
                    planned = plan_batch(reader, index, batch, now, min_entry_id=min_entry_id)
                    if due is not None:
                        got = {p.subscriber_id for p in planned}
                        for sub in batch:
                            if sub.id not in got:
                                due.quiet.note(sub, periods[sub.id], newest)
                    reader.rollback()  # end the read transaction; SQLite must not hold it
                    if on_planned is not None:
                        for p in planned:
                            on_planned(p)
                    if dry_run:
                        report.planned += len(planned)
                        continue
                    with session_factory() as writer, writer.begin():
                        written = write_plan(writer, planned, domain, claim)
                    report.planned += len(written.rows)
                    if written.rows:
                        yield written


def load_for_plan(
    session: Session,
    now: datetime,
    window: timedelta,
    synonyms: Mapping[str, Sequence[str]] | None,
    *,
    highlights: bool = False,
) -> tuple[MatchIndex, int]:
    """The index of the window's entries, and the oldest entry id in it. `highlights`: for
    a run that sends what it plans and highlights from this index (`Composer.use_index`)."""
    index, _ = load_index(session, now, window, synonyms, highlights=highlights)
    oldest = session.scalar(select(func.min(Entry.id)).where(in_window(now, window)))
    return index, oldest or 0
