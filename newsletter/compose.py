"""From ledger rows (or fresh picks, for previews) to `render.Digest` objects.

This is the one place that knows how a digest's links are made and which stored fields feed
the templates, so a preview, a dry run and a real send show the same email.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.matching import Highlighter, Pick
from newsletter.models import Delivery, DeliveryItem, Entry, Feed, Subscriber
from newsletter.render import Digest, DigestItem, Renderer, make_item, shorten
from newsletter.tokens import Purpose, Signer

ITEM_CACHE_SIZE = 4_096
PAPER_CACHE_SIZE = 20_000  # a run's window of papers, with room


@dataclass(frozen=True, slots=True)
class Paper:
    """What a digest shows of a stored entry, read once per run (not once per reader)."""

    id: int
    title: str
    link: str | None
    summary: str
    published: datetime | None
    authors: tuple[str, ...]
    source: str

    @classmethod
    def of(cls, entry: Entry, source: str) -> Paper:
        return cls(
            entry.id,
            entry.title,
            entry.link,
            entry.summary_text,
            entry.published,
            tuple(entry.authors or ()),
            source,
        )


PAPER_COLUMNS = (
    Entry.id,
    Entry.title,
    Entry.link,
    Entry.summary_text,
    Entry.published,
    Entry.authors,
    Feed.title,
)


class Composer:
    """Builds digests; hands out one `DigestItem` per (paper, matched keywords), so that the
    highlighting, and the renderer's encoded fragment, are made once per run, not per email.
    Papers and their shortened summaries are kept for the run too: the same two thousand
    papers appear in every batch."""

    def __init__(self, renderer: Renderer, signer: Signer) -> None:
        self.renderer = renderer
        self.signer = signer
        self.base_url = renderer.settings.base_url.rstrip("/")
        self.highlighter = Highlighter(renderer.settings.synonyms or None)
        self._items: dict[tuple[Any, ...], DigestItem] = {}
        self._papers: dict[int, tuple[Paper, tuple[str, bool]]] = {}

    def links(self, subscriber_id: int, email: str) -> dict[str, str]:
        unsubscribe = self.signer.make(Purpose.UNSUBSCRIBE, subscriber_id, email)
        manage = self.signer.make(Purpose.MANAGE, subscriber_id, email)
        return {
            "manage_url": f"{self.base_url}/manage/{manage}",
            "unsubscribe_url": f"{self.base_url}/unsubscribe/{unsubscribe}",
            "unsubscribe_mailto": self.renderer.unsubscribe_mailto(unsubscribe),
        }

    def known_papers(self) -> set[int]:
        return set(self._papers)

    def add_paper(self, paper: Paper) -> None:
        if len(self._papers) >= PAPER_CACHE_SIZE:
            self._papers.clear()
            self._items.clear()
        self._papers[paper.id] = (paper, shorten(paper.summary))

    def paper_item(self, paper_id: int, hits: Sequence[Mapping[str, Any]]) -> DigestItem:
        """The item for a paper already given to `add_paper`."""
        key = (
            paper_id,
            # As stored: make_item reads a missing flag differently from a False one.
            tuple((h["keyword"], h.get("title"), h.get("summary")) for h in hits),
        )
        found = self._items.get(key)
        if found is None:
            if len(self._items) >= ITEM_CACHE_SIZE:
                self._items.clear()
            paper, short = self._papers[paper_id]
            found = self._items[key] = make_item(
                title=paper.title,
                link=paper.link,
                summary=paper.summary,
                short=short,
                hits=hits,
                published=paper.published,
                authors=paper.authors,
                source=paper.source,
                highlighter=self.highlighter,
            )
        return found

    def item(self, paper: Paper, hits: Sequence[Mapping[str, Any]]) -> DigestItem:
        cached = self._papers.get(paper.id)
        if cached is None or cached[0] != paper:
            self.add_paper(paper)
        return self.paper_item(paper.id, hits)

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
) -> list[tuple[int, Digest]]:
    """(delivery id, digest) for a batch, in three plain-column queries whatever its size;
    papers the composer already holds are not read again."""
    deliveries = session.execute(
        select(
            Delivery.id,
            Delivery.subscriber_id,
            Delivery.period,
            Delivery.message_id,
            Subscriber.email,
        )
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.id.in_(delivery_ids))
        .order_by(Delivery.id)
    ).all()
    rows = session.execute(
        select(DeliveryItem.delivery_id, DeliveryItem.entry_id, DeliveryItem.hits)
        .where(DeliveryItem.delivery_id.in_(delivery_ids))
        .order_by(DeliveryItem.delivery_id, DeliveryItem.rank)
    ).all()
    missing = {entry_id for _, entry_id, _ in rows} - composer.known_papers()
    if missing:
        for entry_id, title, link, summary, published, authors, source in session.execute(
            select(*PAPER_COLUMNS).join(Feed, Feed.id == Entry.feed_id).where(Entry.id.in_(missing))
        ):
            composer.add_paper(
                Paper(entry_id, title, link, summary, published, tuple(authors or ()), source or "")
            )
    items: dict[int, list[DigestItem]] = {}
    for delivery_id, entry_id, hits in rows:
        items.setdefault(delivery_id, []).append(composer.paper_item(entry_id, hits))
    return [
        (
            delivery_id,
            composer.digest(
                subscriber_id=subscriber_id,
                email=email,
                period=period,
                day=period_day(period, now),
                message_id=message_id,
                items=items.get(delivery_id, []),
            ),
        )
        for delivery_id, subscriber_id, period, message_id, email in deliveries
    ]


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
        e.id: Paper.of(e, title or "")
        for e, title in session.execute(
            select(Entry, Feed.title).join(Feed).where(Entry.id.in_(ids))
        )
    }
    items = []
    for p in picks:
        hits = [
            {"keyword": h.keyword, "title": h.in_title, "summary": h.in_summary} for h in p.hits
        ]
        items.append(composer.item(found[p.doc_id], hits))
    return composer.digest(
        subscriber_id=sub.id,
        email=sub.email,
        period=period,
        day=period_day(period, now),
        message_id=message_id,
        items=items,
    )
