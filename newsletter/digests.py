"""Deciding what each subscriber gets this period, and writing it to the ledger before any mail
leaves.

Planning is separate from sending: a planned digest is a `Delivery` row plus its
`DeliveryItem` rows, committed together. After that, whatever happens to the process, the
period's digest for that person exists exactly once and its content is fixed, so a retry or
another worker sends the very same email (same Message-ID) and never a second one.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from newsletter.matching import Doc, MatchIndex, Pick, Profile
from newsletter.models import (
    Delivery,
    DeliveryItem,
    DeliveryStatus,
    Entry,
    Frequency,
    Subscriber,
    SubscriberStatus,
)

BATCH_SIZE = 1000


def period_for(frequency: Frequency, timezone: str, now: datetime) -> str:
    """The period is the subscriber's own local day (or ISO week), so "today's digest" means
    the same thing to the reader in Tokyo and in Berlin."""
    local = now.astimezone(ZoneInfo(timezone))
    if frequency is Frequency.WEEKLY:
        year, week, _ = local.isocalendar()
        return f"{year}-W{week:02d}"
    return local.date().isoformat()


def message_id(domain: str, subscriber_id: int, period: str) -> str:
    # Fixed at planning time: a resend after a crash carries the same Message-ID, so mail
    # clients that see both copies show one.
    return f"<digest.{period}.{subscriber_id}.{secrets.token_hex(6)}@{domain}>"


def load_index(
    session: Session,
    now: datetime,
    window: timedelta,
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> tuple[MatchIndex, dict[int, datetime]]:
    """Index the entries seen within the window once, for every subscriber to look up."""
    rows = session.execute(
        select(Entry.id, Entry.title, Entry.summary_text, Entry.published, Entry.fetched_at).where(
            Entry.fetched_at >= now - window
        )
    )
    docs = []
    for entry_id, title, summary, published, fetched_at in rows:
        docs.append(Doc(entry_id, title, summary, published or fetched_at))
    return MatchIndex(docs, synonyms), {d.id: d.published for d in docs if d.published}


def profile_of(sub: Subscriber) -> Profile:
    return Profile(tuple(sub.keywords), tuple(sub.exclude), sub.max_items)


@dataclass(frozen=True, slots=True)
class PlannedDigest:
    subscriber_id: int
    email: str
    period: str
    picks: tuple[Pick, ...]


def _batches(session: Session, subscriber_ids: Sequence[int] | None) -> Iterator[list[Subscriber]]:
    """Stream active subscribers in id order, a batch at a time, so memory stays flat."""
    last_id = 0
    while True:
        query = (
            select(Subscriber)
            .where(Subscriber.status == SubscriberStatus.ACTIVE, Subscriber.id > last_id)
            .order_by(Subscriber.id)
            .limit(BATCH_SIZE)
        )
        if subscriber_ids is not None:
            query = query.where(Subscriber.id.in_(subscriber_ids))
        batch = list(session.scalars(query))
        if not batch:
            return
        yield batch
        last_id = batch[-1].id


def plan_batch(
    session: Session, index: MatchIndex, batch: Sequence[Subscriber], now: datetime
) -> list[PlannedDigest]:
    """Pure decisions for one batch, using two look-ups: who already has this period's
    digest, and which candidate papers each person was already sent."""
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
            DeliveryItem.subscriber_id.in_(ids)
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


def write_plan(session: Session, planned: Sequence[PlannedDigest], domain: str) -> int:
    """Insert ledger rows; a row another planner inserted first is skipped, with its items.
    Returns how many digests this call added."""
    if not planned:
        return 0
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = datetime.now().astimezone()
    rows = [
        {
            "subscriber_id": p.subscriber_id,
            "period": p.period,
            "status": DeliveryStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "message_id": message_id(domain, p.subscriber_id, p.period),
            "created_at": now,
        }
        for p in planned
    ]
    stmt = (
        insert(Delivery)
        .on_conflict_do_nothing(index_elements=["subscriber_id", "period"])
        .returning(Delivery.id, Delivery.subscriber_id, Delivery.period)
    )
    inserted = {(sid, period): did for did, sid, period in session.execute(stmt, rows)}
    items = []
    for p in planned:
        delivery_id = inserted.get((p.subscriber_id, p.period))
        if delivery_id is None:
            continue
        for rank, pick in enumerate(p.picks):
            items.append(
                {
                    "subscriber_id": p.subscriber_id,
                    "entry_id": pick.doc_id,
                    "delivery_id": delivery_id,
                    "rank": rank,
                    "hits": [
                        {"keyword": h.keyword, "title": h.in_title, "summary": h.in_summary}
                        for h in pick.hits
                    ],
                }
            )
    if items:
        item_stmt = insert(DeliveryItem).on_conflict_do_nothing(
            index_elements=["subscriber_id", "entry_id"]
        )
        for start in range(0, len(items), 1000):
            session.execute(item_stmt, items[start : start + 1000])
    return len(inserted)


@dataclass
class PlanReport:
    subscribers: int = 0
    planned: int = 0
    candidates: int = 0


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
) -> PlanReport:
    """Plan every active subscriber's digest for the period that `now` falls in. Each batch
    commits on its own, so a crash mid-way keeps what was planned and the next run plans the
    rest."""
    report = PlanReport()
    with session_factory() as reader:
        index, _ = load_index(reader, now, window, synonyms)
        report.candidates = len(index)
        for batch in _batches(reader, subscriber_ids):
            report.subscribers += len(batch)
            planned = plan_batch(reader, index, batch, now)
            reader.rollback()  # end the read transaction; SQLite must not hold it while writing
            if on_planned is not None:
                for p in planned:
                    on_planned(p)
            if dry_run:
                report.planned += len(planned)
                continue
            with session_factory() as writer, writer.begin():
                report.planned += write_plan(writer, planned, domain)
    return report
