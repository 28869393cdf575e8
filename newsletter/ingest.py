"""Feeds into the database: fetch each feed, parse it, store new entries once per (feed, id).

A feed that fails is recorded on its row (last error, failure count, a back-off time) and the
run moves on to the next one: one broken feed never stops the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from newsletter.app import App
from newsletter.db import transaction
from newsletter.fetch import FetchError, fetch
from newsletter.models import DeliveryItem, Entry, Feed, utcnow
from newsletter.parse import EntryData, FeedParseError, parse_feed

log = logging.getLogger(__name__)

# A failing feed is retried after 5 min, 10, 20, … up to a day, so a dead feed costs little.
BACKOFF_BASE = timedelta(minutes=5)
BACKOFF_MAX = timedelta(days=1)


class FeedExists(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class FeedReport:
    feed_id: int
    url: str
    ok: bool
    new_entries: int = 0
    seen_entries: int = 0
    message: str = ""
    seconds: float = 0.0


def normalize_source(source: str) -> str:
    """Local paths are stored absolute, so `fetch` works from any working directory."""
    if "://" in source:
        return source.strip()
    return str(Path(source).expanduser().resolve())


def add_feed(session: Session, source: str) -> Feed:
    url = normalize_source(source)
    if session.scalar(select(Feed).where(Feed.url == url)) is not None:
        raise FeedExists(f"feed {url} is already there")
    feed = Feed(url=url)
    session.add(feed)
    session.flush()
    return feed


def remove_feed(session: Session, key: str) -> Feed | None:
    """By id or by URL/path; entries go with it, and with them their places in digests
    (`DeliveryItem` has no foreign key to cascade from; see models). Deliveries stay in the
    ledger."""
    feed = session.get(Feed, int(key)) if key.isdigit() else None
    if feed is None:
        feed = session.scalar(select(Feed).where(Feed.url == normalize_source(key)))
    if feed is not None:
        entries = select(Entry.id).where(Entry.feed_id == feed.id)
        session.execute(delete(DeliveryItem).where(DeliveryItem.entry_id.in_(entries)))
        session.delete(feed)
    return feed


def entry_counts(session: Session) -> dict[int, int]:
    rows = session.execute(select(Entry.feed_id, func.count()).group_by(Entry.feed_id))
    return {feed_id: count for feed_id, count in rows}


def store_entries(
    session: Session, feed_id: int, entries: Sequence[EntryData], now: datetime
) -> int:
    """Insert entries not seen before; returns how many were new. ON CONFLICT DO NOTHING makes
    two fetchers racing on the same feed harmless."""
    if not entries:
        return 0
    rows = [
        {
            "feed_id": feed_id,
            "guid": e.guid,  # parse.py keeps it within the column's width
            "title": e.title,
            "summary_html": e.summary_html,
            "summary_text": e.summary_text,
            "link": e.link,
            "authors": list(e.authors),
            "categories": list(e.categories),
            # A feed that dates its papers in 2099 would pin them to the top of every ranking.
            "published": min(e.published, now) if e.published else None,
            "fetched_at": now,
        }
        for e in entries
    ]
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(Entry).on_conflict_do_nothing(index_elements=["feed_id", "guid"])
    before = session.scalar(select(func.count()).where(Entry.feed_id == feed_id)) or 0
    for start in range(0, len(rows), 500):
        session.execute(stmt, rows[start : start + 500])
    after = session.scalar(select(func.count()).where(Entry.feed_id == feed_id)) or 0
    return after - before


def _record_failure(feed: Feed, message: str, now: datetime) -> None:
    feed.last_fetched_at = now
    feed.last_error = message
    feed.last_error_at = now
    feed.consecutive_failures += 1
    delay = min(BACKOFF_BASE * 2 ** (feed.consecutive_failures - 1), BACKOFF_MAX)
    feed.next_fetch_at = now + delay


def _follow_move(session: Session, feed: Feed, new_url: str) -> str | None:
    """Store the URL a permanent redirect points to, unless it cannot be stored or belongs to
    another feed; returns a warning for the operator in those cases."""
    if len(new_url) > 2048:
        return "the feed moved permanently to a URL over 2048 characters; kept the old URL"
    other = session.scalar(select(Feed.id).where(Feed.url == new_url, Feed.id != feed.id))
    if other is not None:
        return (
            f"the feed moved permanently to {new_url}, which is feed {other} already; "
            "remove one of the two"
        )
    log.info("feed %s moved permanently to %s", feed.url, new_url)
    feed.url = new_url
    return None


def fetch_feed(app: App, feed_id: int, client: httpx.Client | None = None) -> FeedReport:
    started = time.monotonic()
    settings = app.settings
    with app.session() as session:
        feed = session.get(Feed, feed_id)
        if feed is None:
            raise LookupError(f"no feed with id {feed_id}")
        url, etag, last_modified = feed.url, feed.etag, feed.last_modified

    def done(ok: bool, message: str, new: int = 0, seen: int = 0) -> FeedReport:
        return FeedReport(feed_id, url, ok, new, seen, message, time.monotonic() - started)

    now = utcnow()
    try:
        result = fetch(
            url,
            etag=etag,
            last_modified=last_modified,
            timeout=settings.fetch_timeout,
            max_bytes=settings.fetch_max_bytes,
            client=client,
        )
        parsed = None
        if result.status == "ok":
            assert result.body is not None
            parsed = parse_feed(result.body, base_url=result.url, content_type=result.content_type)
    except (FetchError, FeedParseError) as exc:
        message = str(exc)
        with transaction(app.sessions) as session:
            feed = session.get(Feed, feed_id)
            if feed is not None:
                _record_failure(feed, message, now)
        log.warning("feed %s: %s", url, message)
        return done(False, message)

    with transaction(app.sessions) as session:
        feed = session.get(Feed, feed_id)
        if feed is None:  # removed while we were fetching
            return done(False, "feed was removed during the fetch")
        feed.last_fetched_at = now
        moved_warning = None
        if result.url != feed.url:
            moved_warning = _follow_move(session, feed, result.url)
        if result.status == "gone":
            feed.enabled = False
            feed.last_error = "the server says the feed is gone for good (HTTP 410); disabled it"
            feed.last_error_at = now
            log.warning("feed %s: %s", url, feed.last_error)
            return done(False, feed.last_error)
        feed.last_success_at = now
        feed.consecutive_failures = 0
        feed.next_fetch_at = None
        feed.last_error = None
        if result.status == "not_modified" or parsed is None:
            return done(True, "not modified")
        # Validators longer than their columns are dropped: conditional GET is an optimisation.
        feed.etag = result.etag if result.etag and len(result.etag) <= 512 else None
        feed.last_modified = (
            result.last_modified
            if result.last_modified and len(result.last_modified) <= 128
            else None
        )
        if parsed.title and not feed.title:
            feed.title = parsed.title[:512]
        new = store_entries(session, feed_id, parsed.entries, now)
        message = f"{new} new of {len(parsed.entries)}"
        warning = "; ".join(w for w in (moved_warning, parsed.warning) if w)
        if warning:
            feed.last_error = warning
            feed.last_error_at = now
            message += f" (warning: {warning})"
    return done(True, message, new, len(parsed.entries))


def _unexpected_failure(app: App, feed_id: int, exc: Exception) -> FeedReport:
    message = f"unexpected error ({type(exc).__name__}: {exc}); see the log"[:1000]
    url = ""
    with transaction(app.sessions) as session:
        feed = session.get(Feed, feed_id)
        if feed is not None:
            url = feed.url
            _record_failure(feed, message, utcnow())
    return FeedReport(feed_id, url, False, message=message)


def due_feeds(session: Session, now: datetime, *, force: bool = False) -> list[int]:
    query = select(Feed.id).where(Feed.enabled).order_by(Feed.id)
    if not force:
        query = query.where((Feed.next_fetch_at.is_(None)) | (Feed.next_fetch_at <= now))
    return list(session.scalars(query))


def fetch_all(
    app: App,
    *,
    force: bool = True,
    feed_ids: Iterable[int] | None = None,
    on_report: Callable[[FeedReport], None] | None = None,
) -> list[FeedReport]:
    """Fetch every enabled feed (or the given ones), one after another, sharing one HTTP client
    so connections to the same host are reused."""
    with app.session() as session:
        ids = list(feed_ids) if feed_ids is not None else due_feeds(session, utcnow(), force=force)
    reports = []
    with httpx.Client(follow_redirects=False, http2=False) as client:
        for feed_id in ids:
            try:
                report = fetch_feed(app, feed_id, client=client)
            except Exception as exc:  # one feed's surprise must not stop the others
                log.exception("feed %s: unexpected error", feed_id)
                report = _unexpected_failure(app, feed_id, exc)
            reports.append(report)
            if on_report is not None:
                on_report(report)
    return reports
