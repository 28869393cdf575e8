"""What a set of keywords would have picked from the recent papers, for the live preview.

The same `MatchIndex` and `highlight` as the digests, so the preview shows exactly what an email
would. The index over the recent papers is built once and reused until the set of recent
papers changes (checked with one cheap COUNT/MAX query), since a person typing asks for many
previews in a row.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import func, select

from newsletter.app import App
from newsletter.matching import Doc, MatchIndex, Profile, highlight
from newsletter.models import Entry, Feed, utcnow
from newsletter.render import shorten

SNIPPET_CHARS = 240
MAX_COUNTED = 500  # "500+ papers matched" is all anyone needs to know past this


@dataclass(frozen=True, slots=True)
class PreviewItem:
    title_parts: Sequence[tuple[str, bool]]
    summary_parts: Sequence[tuple[str, bool]]
    link: str | None
    published: date | None
    source: str
    matched: Sequence[str]


@dataclass(frozen=True, slots=True)
class Preview:
    keywords: tuple[str, ...]
    items: Sequence[PreviewItem]
    matched: int  # how many recent papers matched at all (capped at MAX_COUNTED)
    candidates: int  # how many recent papers there were
    window_days: int

    @property
    def more(self) -> int:
        return max(0, self.matched - len(self.items))


@dataclass(frozen=True, slots=True)
class _Paper:
    title: str
    summary: str
    link: str | None
    published: datetime | None
    source: str


@dataclass(frozen=True, slots=True)
class _Snapshot:
    key: tuple[int, int | None]
    index: MatchIndex
    papers: dict[int, _Paper]


def snippet(
    text: str, keywords: Sequence[str], synonyms: Mapping[str, tuple[str, ...]] | None = None
) -> str:
    """A short piece of the summary that shows the first match, not just its opening lines."""
    text = " ".join(text.split())
    short, _ = shorten(text, SNIPPET_CHARS)
    offset = 0
    for part, marked in highlight(text, keywords, synonyms):
        if marked:
            break
        offset += len(part)
    else:
        return short  # matched in the title only
    if offset + len(part) <= len(short.rstrip("…")):
        return short
    begin = max(0, offset - 80)
    space = text.rfind(" ", 0, begin)
    begin = space + 1 if space >= 0 else begin
    tail, _ = shorten(text[begin:], SNIPPET_CHARS)
    return "…" + tail


class RecentPapers:
    def __init__(self, app: App) -> None:
        self.app = app
        self.window_days = app.settings.entry_window_days
        self.synonyms = app.settings.synonyms or None
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None

    def _cutoff(self) -> datetime:
        return utcnow() - timedelta(days=self.window_days)

    def _current(self) -> _Snapshot:
        cutoff = self._cutoff()
        with self.app.session() as session:
            count, newest = session.execute(
                select(func.count(Entry.id), func.max(Entry.id)).where(Entry.fetched_at >= cutoff)
            ).one()
            key = (int(count), newest)
            snap = self._snapshot
            if snap is not None and snap.key == key:
                return snap
            rows = session.execute(
                select(
                    Entry.id,
                    Entry.title,
                    Entry.summary_text,
                    Entry.link,
                    Entry.published,
                    Entry.fetched_at,
                    Feed.title,
                )
                .join(Feed, Feed.id == Entry.feed_id)
                .where(Entry.fetched_at >= cutoff)
            ).all()
        papers: dict[int, _Paper] = {}
        docs = []
        for entry_id, title, summary, link, published, fetched_at, source in rows:
            papers[entry_id] = _Paper(title, summary, link, published, source or "")
            docs.append(Doc(entry_id, title, summary, published or fetched_at))
        snap = _Snapshot(key, MatchIndex(docs, self.synonyms), papers)
        with self._lock:
            self._snapshot = snap
        return snap

    def preview(self, keywords: Sequence[str], exclude: Sequence[str], max_items: int) -> Preview:
        """Blocking (database and CPU): call it from a thread."""
        snap = self._current()
        keywords = tuple(keywords)
        picks = snap.index.match(Profile(keywords, tuple(exclude), MAX_COUNTED)) if keywords else []
        items = []
        for pick in picks[:max_items]:
            paper = snap.papers[pick.doc_id]
            matched = [hit.keyword for hit in pick.hits]
            summary = snippet(paper.summary, matched, self.synonyms)
            items.append(
                PreviewItem(
                    title_parts=highlight(paper.title, matched, self.synonyms),
                    summary_parts=highlight(summary, matched, self.synonyms),
                    link=paper.link if paper.link and _SAFE_LINK.match(paper.link) else None,
                    published=paper.published.date() if paper.published else None,
                    source=paper.source,
                    matched=matched,
                )
            )
        return Preview(keywords, items, len(picks), len(snap.papers), self.window_days)


# Feed links are sanitized at ingest, but a page link is a place where "javascript:" would
# matter, so check again.
_SAFE_LINK = re.compile(r"^https?://", re.IGNORECASE)
