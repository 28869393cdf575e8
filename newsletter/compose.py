"""From ledger rows (or fresh picks, for previews) to `render.Digest` objects.

This is the one place that knows how a digest's links are made and which stored fields feed
the templates, so a preview, a dry run and a real send show the same email.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.matching import Pick
from newsletter.models import Delivery, DeliveryItem, Entry, Feed, Subscriber
from newsletter.render import Digest, DigestItem, Renderer, make_item
from newsletter.tokens import Purpose, Signer

ITEM_CACHE_SIZE = 10_000


class Composer:
    """Builds digests; hands out one `DigestItem` per (paper, matched keywords), so that the
    highlighting, and the renderer's encoded fragment, are made once per run, not per email."""

    def __init__(self, renderer: Renderer, signer: Signer) -> None:
        self.renderer = renderer
        self.signer = signer
        self.base_url = renderer.settings.base_url.rstrip("/")
        self.synonyms = renderer.settings.synonyms or None
        self._items: dict[tuple[Any, ...], DigestItem] = {}

    def links(self, subscriber_id: int, email: str) -> dict[str, str]:
        unsubscribe = self.signer.make(Purpose.UNSUBSCRIBE, subscriber_id, email)
        manage = self.signer.make(Purpose.MANAGE, subscriber_id, email)
        return {
            "manage_url": f"{self.base_url}/manage/{manage}",
            "unsubscribe_url": f"{self.base_url}/unsubscribe/{unsubscribe}",
            "unsubscribe_mailto": self.renderer.unsubscribe_mailto(unsubscribe),
        }

    def item(self, entry: Entry, source: str, hits: Sequence[Mapping[str, Any]]) -> DigestItem:
        key = (
            entry.id,
            source,
            tuple((h["keyword"], bool(h.get("title")), bool(h.get("summary"))) for h in hits),
        )
        found = self._items.get(key)
        if found is None:
            if len(self._items) >= ITEM_CACHE_SIZE:
                self._items.clear()
            found = self._items[key] = self._make_item(entry, source, hits)
        return found

    def _make_item(
        self, entry: Entry, source: str, hits: Sequence[Mapping[str, Any]]
    ) -> DigestItem:
        return make_item(
            title=entry.title,
            link=entry.link,
            summary=entry.summary_text,
            hits=hits,
            published=entry.published,
            authors=entry.authors,
            source=source,
            synonyms=self.synonyms,
        )

    def digest(
        self,
        *,
        subscriber_id: int,
        email: str,
        period: str,
        day: date,
        message_id: str,
        items: Sequence[DigestItem],
    ) -> Digest:
        links = self.links(subscriber_id, email)
        return Digest(
            to=email,
            period=period,
            day=day,
            items=items,
            message_id=message_id,
            manage_url=links["manage_url"],
            unsubscribe_url=links["unsubscribe_url"],
            unsubscribe_mailto=links["unsubscribe_mailto"],
        )


def period_day(period: str, fallback: datetime) -> date:
    try:
        return date.fromisoformat(period)
    except ValueError:  # weekly periods ("2026-W47") show the day they are sent
        return fallback.date()


def load_deliveries(
    session: Session, composer: Composer, delivery_ids: Sequence[int], now: datetime
) -> list[tuple[Delivery, Digest]]:
    """Three queries for a whole batch, whatever its size."""
    deliveries = list(
        session.scalars(select(Delivery).where(Delivery.id.in_(delivery_ids)).order_by(Delivery.id))
    )
    subscribers = {
        s.id: s
        for s in session.scalars(
            select(Subscriber).where(Subscriber.id.in_({d.subscriber_id for d in deliveries}))
        )
    }
    rows = session.execute(
        select(DeliveryItem, Entry, Feed.title)
        .join(Entry, Entry.id == DeliveryItem.entry_id)
        .join(Feed, Feed.id == Entry.feed_id)
        .where(DeliveryItem.delivery_id.in_(delivery_ids))
        .order_by(DeliveryItem.delivery_id, DeliveryItem.rank)
    )
    items: dict[int, list[DigestItem]] = {}
    for item, entry, feed_title in rows:
        items.setdefault(item.delivery_id, []).append(
            composer.item(entry, feed_title or "", item.hits)
        )
    out = []
    for d in deliveries:
        sub = subscribers[d.subscriber_id]
        out.append(
            (
                d,
                composer.digest(
                    subscriber_id=sub.id,
                    email=sub.email,
                    period=d.period,
                    day=period_day(d.period, now),
                    message_id=d.message_id,
                    items=items.get(d.id, []),
                ),
            )
        )
    return out


def digest_from_picks(
    session: Session,
    composer: Composer,
    sub: Subscriber,
    picks: Sequence[Pick],
    *,
    period: str,
    now: datetime,
    message_id: str,
) -> Digest:
    """For previews and dry runs: the same digest a send would produce, without a ledger row."""
    ids = [p.doc_id for p in picks]
    found = {
        e.id: (e, title or "")
        for e, title in session.execute(
            select(Entry, Feed.title).join(Feed).where(Entry.id.in_(ids))
        )
    }
    items = []
    for p in picks:
        entry, source = found[p.doc_id]
        hits = [
            {"keyword": h.keyword, "title": h.in_title, "summary": h.in_summary} for h in p.hits
        ]
        items.append(composer.item(entry, source, hits))
    return composer.digest(
        subscriber_id=sub.id,
        email=sub.email,
        period=period,
        day=period_day(period, now),
        message_id=message_id,
        items=items,
    )
