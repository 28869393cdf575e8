"""From ledger rows (or fresh picks, for previews) to `render.Digest` objects.

This is the one place that knows how a digest's links are made and which stored fields feed
the templates, so a preview, a dry run and a real send show the same email.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from itertools import islice

from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.digests import Written
from newsletter.matching import Highlighter, MatchIndex, Pick
from newsletter.models import Delivery, DeliveryItem, Entry, Feed, Subscriber
from newsletter.render import (
    FRAGMENT_CACHE_SIZE,
    Digest,
    DigestItem,
    ItemHit,
    Renderer,
    ShownPaper,
    stored_hits,
)
from newsletter.tokens import Purpose, Signer

PAPER_CACHE_SIZE = 20_000  # a run's window of papers, with room


@dataclass(frozen=True, slots=True)
class Paper:
    """A stored entry as digests show it, read once per run (not once per reader)."""

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

    def shown(self) -> ShownPaper:
        return ShownPaper.of(
            title=self.title,
            link=self.link,
            summary=self.summary,
            published=self.published,
            authors=self.authors,
            source=self.source,
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


def read_papers(session: Session, ids: Iterable[int]) -> Iterator[Paper]:
    for entry_id, title, link, summary, published, authors, source in session.execute(
        select(*PAPER_COLUMNS).join(Feed, Feed.id == Entry.feed_id).where(Entry.id.in_(ids))
    ):
        yield Paper(entry_id, title, link, summary, published, tuple(authors or ()), source or "")


class Composer:
    """Builds digests. What every reader sees of a paper (`ShownPaper`: shortened summary,
    date, authors) is made once per run: the same two thousand papers appear in every batch,
    and the renderer keeps its work per paper under that object."""

    def __init__(self, renderer: Renderer, signer: Signer) -> None:
        self.renderer = renderer
        self.signer = signer
        self.base_url = renderer.settings.base_url.rstrip("/")
        self.highlighter = Highlighter(renderer.settings.synonyms or None)
        self._papers: dict[int, tuple[Paper, ShownPaper]] = {}
        self._index: MatchIndex | None = None

    def use_index(self, index: MatchIndex) -> None:
        """Highlight the papers `index` holds from it (the planner's, which analysed them
        already) rather than analysing each text again."""
        self._index = index
        for paper, shown in self._papers.values():
            self._indexed(paper.id, shown)

    def _indexed(self, paper_id: int, shown: ShownPaper) -> None:
        if self._index is not None:
            self.highlighter.indexed(shown.title, self._index, paper_id, title=True)
            self.highlighter.indexed(shown.summary, self._index, paper_id, title=False)

    def links(self, subscriber_id: int, email: str) -> dict[str, str]:
        unsubscribe, manage = self.signer.make_all(
            (Purpose.UNSUBSCRIBE, Purpose.MANAGE), subscriber_id, email
        )
        return {
            "manage_url": f"{self.base_url}/manage/{manage}",
            "unsubscribe_url": f"{self.base_url}/unsubscribe/{unsubscribe}",
            "unsubscribe_mailto": self.renderer.unsubscribe_mailto(unsubscribe),
        }

    def missing(self, ids: Iterable[int]) -> set[int]:
        """The papers among `ids` this composer does not hold yet."""
        return set(ids).difference(self._papers)

    def read_papers(self, session: Session, ids: Iterable[int]) -> None:
        """Read the papers among `ids` that this composer does not hold yet."""
        missing = self.missing(ids)
        if missing:
            for paper in read_papers(session, missing):
                self.add_paper(paper)

    def add_paper(self, paper: Paper) -> None:
        if len(self._papers) >= PAPER_CACHE_SIZE:
            self._papers.clear()
        shown = paper.shown()
        self._papers[paper.id] = (paper, shown)
        self._indexed(paper.id, shown)

    def prepare(self, ids: Iterable[int]) -> Iterator[None]:
        """Make the template skeleton of each paper among `ids` that this composer holds
        (`read_papers`), a paper per step, so that a caller with time to spare (a helper
        process of `send`, waiting for the index) can stop between any two. The first email
        to show a paper makes it otherwise: 0.2 ms a paper, 0.4 s of a helper's share of
        10,000 readers."""
        for paper_id in islice(ids, FRAGMENT_CACHE_SIZE):  # what the renderer keeps
            if paper_id in self._papers:
                self.renderer.prepare(self.paper_item(paper_id, ()))
                yield

    def paper_item(self, paper_id: int, hits: tuple[ItemHit, ...]) -> DigestItem:
        """The item for a paper already given to `add_paper`."""
        return DigestItem(self._papers[paper_id][1], hits, self.highlighter)

    def item(self, paper: Paper, hits: tuple[ItemHit, ...]) -> DigestItem:
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
    composer.read_papers(session, {entry_id for _, entry_id, _ in rows})
    items: dict[int, list[DigestItem]] = {}
    for delivery_id, entry_id, hits in rows:
        items.setdefault(delivery_id, []).append(composer.paper_item(entry_id, stored_hits(hits)))
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


def planned_papers(rows: Sequence[Written]) -> set[int]:
    """The papers that rows just written (`digests.write_plan`) show."""
    return {pick.doc_id for row in rows for pick in row.planned.picks}


def planned_digest(composer: Composer, row: Written, now: datetime) -> Digest:
    """What `load_deliveries` would read back for a row just written, made from the plan in
    memory instead: the same digest (tested), without reading back and decoding ten item rows
    per reader. Its papers must be known to `composer` (`planned_papers`); `send` makes each
    digest just before rendering it."""
    planned = row.planned
    item = composer.paper_item
    return composer.digest(
        subscriber_id=planned.subscriber_id,
        email=planned.email,
        period=planned.period,
        day=period_day(planned.period, now),
        message_id=row.message_id,
        items=[item(pick.doc_id, pick.hits) for pick in planned.picks],
    )


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
    items = [composer.item(found[p.doc_id], p.hits) for p in picks]
    return composer.digest(
        subscriber_id=sub.id,
        email=sub.email,
        period=period,
        day=period_day(period, now),
        message_id=message_id,
        items=items,
    )
