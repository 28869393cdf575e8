"""Digests into email: Jinja2 templates to HTML and text, then one MIME message.

Render once, personalize cheaply. A digest is a frame (`email/digest.html` / `.txt`: date,
count, the reader's links) around items (`email/digest_item.html` / `.txt`: one paper with its
matched words highlighted). Templates run once per paper and per frame with placeholders for
what belongs to the reader; each email fills them in. An item's encoded bytes (HTML as 7bit,
text as quoted-printable with its hole-free lines encoded ahead) are kept and reused by every
digest with the same paper and matched keywords; per message only the frame, the headers and
the signed links are new (see `mime.py`).

Templates are compiled once per `Renderer`. An operator's own template folder (setting
``templates_dir``) is searched before the built-in one, so overriding one file leaves the rest
as shipped; item templates must only use `item`, since their output is shared between readers.
"""

from __future__ import annotations

import dataclasses
import email
import functools
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr, parseaddr
from pathlib import Path
from typing import Any, NamedTuple, overload
from urllib.parse import quote

from jinja2 import (
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    StrictUndefined,
    nodes,
    select_autoescape,
)
from markupsafe import Markup

from newsletter import mime
from newsletter.config import Settings
from newsletter.matching import Highlighter, Marks, segments

log = logging.getLogger(__name__)
BUILTIN_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
SUMMARY_LIMIT = 480  # keeps a 50-paper digest under Gmail's 102 KB clipping (tested)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]*")  # what `quote` leaves as it is


@dataclass(frozen=True, slots=True, eq=False)
class ShownPaper:
    """What a digest shows of one paper, the same for every reader: made once per run, not
    once per email. Compared and hashed by identity (the renderer keys the paper's template
    skeleton on it); `of` is the one way to make one."""

    title: str
    link: str | None
    summary: str  # shortened for the email
    truncated: bool
    published: date | None
    authors: str
    source: str
    summary_lines: str  # `summary` with HTML line breaks (see `_broken`), same offsets

    @classmethod
    def of(
        cls,
        *,
        title: str,
        link: str | None,
        summary: str,
        published: datetime | date | None,
        authors: Sequence[str],
        source: str,
    ) -> ShownPaper:
        short, truncated = shorten(summary)
        if isinstance(published, datetime):
            published = published.date()
        return cls(
            title, link, short, truncated, published, ", ".join(authors), source, _broken(short)
        )


# A matched keyword of a pick as items are made from it: (keyword, in title, in summary);
# `matching.Hit` is one. A flag that is None was not recorded: that field is looked in too.
ItemHit = tuple[str, bool | None, bool | None]


def stored_hits(hits: Sequence[Mapping[str, Any]]) -> tuple[ItemHit, ...]:
    """Hits as the ledger keeps them (JSON objects) in the form items are made from."""
    return tuple((str(h["keyword"]), h.get("title"), h.get("summary")) for h in hits)


@dataclass(frozen=True, slots=True, eq=False)
class DigestItem:
    """One paper as shown to one set of matched keywords. Templates read the paper's fields
    through it (``item.title``) as well as the reader's (``item.title_parts``, made when
    read: sending cuts highlights into the paper's HTML straight from `hits`, see
    `_ItemSkeleton.encode`, and never needs them). The renderer keeps each item's encoded
    fragment under (paper, hits): many readers get the same paper for the same keywords."""

    paper: ShownPaper
    hits: tuple[ItemHit, ...]
    highlighter: Highlighter

    @property
    def title(self) -> str:
        return self.paper.title

    @property
    def link(self) -> str | None:
        return self.paper.link

    @property
    def summary(self) -> str:
        return self.paper.summary

    @property
    def truncated(self) -> bool:
        return self.paper.truncated

    @property
    def published(self) -> date | None:
        return self.paper.published

    @property
    def authors(self) -> str:
        return self.paper.authors

    @property
    def source(self) -> str:
        return self.paper.source

    @property
    def matched(self) -> list[str]:
        return [h[0] for h in self.hits]

    @property
    def matched_where(self) -> str:
        return _hit_facts(self.hits).where

    @property
    def title_parts(self) -> Marked:
        title = self.paper.title
        return Marked(title, self.highlighter.marks(title, _hit_facts(self.hits).in_title))

    @property
    def summary_parts(self) -> Marked:
        marks = self.highlighter.marks(self.paper.summary, _hit_facts(self.hits).in_summary)
        return Marked(self.paper.summary_lines, marks)


_WHERE = ("", "summary", "title", "title and summary")
_WHERE_HTML = {where: where.encode("ascii") for where in _WHERE}  # nothing to escape


@dataclass(frozen=True, slots=True)
class _StandIn:
    """What the item templates see when they run once per paper, placeholders standing in
    for the reader's fields (see `Renderer._item_skeleton`)."""

    title: str
    link: str | None
    summary: str
    truncated: bool
    published: date | None
    authors: str
    source: str
    title_parts: Sequence[tuple[str, bool]]
    summary_parts: Sequence[tuple[str, bool]]
    matched: Sequence[str]
    matched_where: str


@dataclass(frozen=True, slots=True)
class Digest:
    to: str
    period: str
    day: date
    items: Sequence[DigestItem]
    manage_url: str
    unsubscribe_url: str
    unsubscribe_mailto: str
    message_id: str
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Notice:
    """A one-off email (confirm your address, welcome, your manage link), rendered from
    ``email/<kind>.txt``, ``email/<kind>.html`` and ``email/<kind>_subject.txt``."""

    kind: str
    to: str
    context: Mapping[str, Any]
    message_id: str
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None


NOTICE_KINDS = ("confirm", "welcome", "manage_link")


def new_message_id(domain: str, kind: str) -> str:
    return f"<{kind}.{secrets.token_hex(10)}@{domain}>"


def shorten(text: str, limit: int = SUMMARY_LIMIT) -> tuple[str, bool]:
    """Cut at a sentence end if one is near the limit, else at a word; say whether we cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text, False
    head = text[:limit]
    ends = [m.start() for m in _SENTENCE_END.finditer(head)]
    if ends and ends[-1] > limit * 0.6:
        return head[: ends[-1]].rstrip(), True
    return head.rsplit(" ", 1)[0].rstrip(" ,;:-") + "…", True


def make_item(
    paper: ShownPaper, hits: Sequence[ItemHit], highlighter: Highlighter | None = None
) -> DigestItem:
    """Turn a pick (a paper + the reasons it matched) into what the templates show. A send
    run passes its own `Highlighter` (with the operator's synonyms) to share work between the
    many digests that show the same paper."""
    return DigestItem(paper, tuple(hits), highlighter or _default_highlighter())


@functools.cache
def _default_highlighter() -> Highlighter:
    return Highlighter()


class Marked(Sequence[tuple[str, bool]]):
    """A text with its highlights, read as (piece, highlighted) segments the way templates
    iterate them, but cut into pieces only if something iterates it: sending fills the
    highlights into the paper's HTML straight from `marks` (`_ItemSkeleton`), so the segments
    of most items are never made."""

    __slots__ = ("_parts", "marks", "text")

    def __init__(self, text: str, marks: Marks) -> None:
        self.text = text
        self.marks = marks
        self._parts: list[tuple[str, bool]] | None = None

    def _segments(self) -> list[tuple[str, bool]]:
        if self._parts is None:
            self._parts = segments(self.text, self.marks)
        return self._parts

    @overload
    def __getitem__(self, index: int) -> tuple[str, bool]: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[str, bool]]: ...
    def __getitem__(self, index: int | slice) -> tuple[str, bool] | Sequence[tuple[str, bool]]:
        return self._segments()[index]

    def __len__(self) -> int:
        return len(self._segments())

    def __iter__(self) -> Iterator[tuple[str, bool]]:
        return iter(self._segments())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Marked):
            return self.text == other.text and self.marks == other.marks
        return isinstance(other, Sequence) and list(self) == list(other)

    def __hash__(self) -> int:
        return hash((self.text, self.marks))

    def __repr__(self) -> str:
        return f"Marked({self._segments()!r})"


_SUMMARY_LINE = re.compile(r"(?:.{1,64}|[^ ]+)(?= |$)")


@functools.lru_cache(maxsize=8192)
def _broken(text: str) -> str:
    """`text` with a line break, which HTML shows as a space, every 64 characters or so, at
    the same places for every reader of the paper. The HTML part goes out 7bit, at most 998
    octets a line: a summary with many highlights (75 characters of markup each) would pass
    that on one line and need quoted-printable. Spaces become line breaks one for one, so
    highlight positions found in `text` hold in the result."""
    breaks = [m.end() for m in _SUMMARY_LINE.finditer(text)][:-1]
    if not breaks:
        return text
    chars = list(text)
    for at in breaks:
        if chars[at] == " ":
            chars[at] = "\n"
    return "".join(chars)


def _wrap(text: str, width: int = 72, indent: str = "", subsequent: str | None = None) -> str:
    """Greedy word wrap; long words (URLs) stay whole. textwrap does the same with regexes and
    hyphen handling we do not use, at several times the cost (it dominated rendering); so did
    a loop over the words. One regex per line width: the longest run of words that fits, or
    else one word on its own (tested against textwrap)."""
    later = indent if subsequent is None else subsequent
    words = " ".join(text.split())
    if not words:
        return ""
    first = _line_pattern(max(width - len(indent), 1)).match(words)
    assert first is not None  # a non-empty text always starts a line
    lines = [indent + first[1]]
    rest = _line_pattern(max(width - len(later), 1))
    lines += [later + m[1] for m in rest.finditer(words, first.end())]
    return "\n".join(lines)


@functools.lru_cache(maxsize=16)
def _line_pattern(room: int) -> re.Pattern[str]:
    return re.compile(f"(.{{1,{room}}}(?= |$)|[^ ]+) ?")


def domain_of(address: str) -> str:
    _, addr = parseaddr(address)
    return addr.rpartition("@")[2] or "localhost"


class _FlatGlobalsEnvironment(Environment):
    """An Environment whose templates' globals are one plain dict rather than Jinja's
    ChainMap over the environment's. Each render copies a template's globals into a new
    context, and each ``{% from ... import %}`` compares the two sets of keys: through a
    ChainMap that is Python code (a paper's item skeleton took 101 µs with it, 85 µs
    without). Jinja asks that globals not change once a template is loaded; these never do."""

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        return {**self.globals, **(d or {})}


class Renderer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        folders = [Path(settings.templates_dir)] if settings.templates_dir else []
        folders.append(BUILTIN_TEMPLATES)
        self.env = _FlatGlobalsEnvironment(
            loader=ChoiceLoader([FileSystemLoader(str(f)) for f in folders]),
            autoescape=select_autoescape(["html", "htm", "xml"], default_for_string=True),
            undefined=StrictUndefined,
            auto_reload=False,  # compiled once per Renderer; no stat() per render
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["wrap"] = _wrap
        self._html = self.env.get_template("email/digest.html")
        self._text = self.env.get_template("email/digest.txt")
        self._item_html = self.env.get_template("email/digest_item.html")
        self._item_text = self.env.get_template("email/digest_item.txt")
        self._subject = self.env.get_template("email/digest_subject.txt")
        from_name, from_addr = parseaddr(settings.from_addr)
        if not from_addr:
            raise ValueError(f"from_addr {settings.from_addr!r} has no email address")
        self.sender = Address(display_name=from_name, addr_spec=from_addr)
        self.domain = domain_of(from_addr)
        # Headers that are the same on every message, encoded once.
        self._from_header = mime.address_list_header(
            "From", [formataddr((from_name, from_addr), charset="utf-8")]
        )
        self._fixed_headers = "".join(
            [
                *(
                    [mime.address_list_header("Reply-To", [settings.reply_to])]
                    if settings.reply_to
                    else []
                ),
                mime.encode_header("List-Id", settings.list_id),
                mime.encode_header("Auto-Submitted", "auto-generated"),
                mime.encode_header("X-Auto-Response-Suppress", "All"),
            ]
        )
        from newsletter.dkim import Signer as DkimSigner

        self._dkim = DkimSigner.from_settings(settings)
        self._fragments: OrderedDict[tuple[ShownPaper, tuple[ItemHit, ...]], _Fragment] = (
            OrderedDict()
        )
        self._seen_items: set[int] = set()  # hashes of items encoded once
        self._qp = mime.QPLines()  # most lines of most emails were encoded for an earlier one
        # Fill-in renders (see _Skeletons): on unless a template turns out to need more.
        self._slots = _Slots()
        self._frame_skeletons: dict[tuple[int, date], _FrameSkeleton] = {}
        self._item_skeletons: dict[ShownPaper, _ItemSkeleton] = {}
        self._skeletons_made = 0
        self._encoded = 0  # items encoded the fast way (the first few are checked)
        self._mark_around: tuple[str, str] | tuple[()] | None = None
        self.fill_in = _fill_in_safe(self.env)
        if not self.fill_in:
            log.info("templates use the reader's fields beyond printing them: full rendering")
        self._subjects: dict[tuple[int, date], str] = {}
        self._subject_lines: dict[str, str] = {}
        self._date: tuple[datetime | None, str] = (None, "")

    def context(self, digest: Digest) -> dict[str, Any]:
        return {
            "digest": digest,
            "items": _ITEMS,
            "count": len(digest.items),
            "day": digest.day,
            "preheader": digest.items[0].title if digest.items else "",
            "base_url": self.settings.base_url.rstrip("/"),
            "contact": self.settings.reply_to or self.sender.addr_spec,
            "postal_address": self.settings.postal_address,
            **digest.extra,
        }

    def subject(self, digest: Digest) -> str:
        key = (len(digest.items), digest.day)
        found = self._subjects.get(key)
        if found is None:
            # Subjects are headers: no line breaks may survive, whatever a template does.
            found = " ".join(self._subject.render(self.context(digest)).split())
            if len(self._subjects) > 1000:
                self._subjects.clear()
            self._subjects[key] = found
        return found

    def _fragment(self, item: DigestItem) -> _Fragment:
        """The item's encoded pieces. Kept for the items seen twice, the last few thousand
        of them: at 100,000 readers most (paper, keywords) items occur once, and keeping
        those pushed out the ones that recur (19.6% of items found kept; 32% this way,
        simulated on a benchmark run's items)."""
        key = (item.paper, item.hits)
        found = self._fragments.get(key)
        if found is not None:
            self._fragments.move_to_end(key)
        else:
            skeleton = self._item_skeleton_for(item)
            if skeleton is None:
                text, html = self._item_strs(item)
                text_qp, html_7bit = self._qp(text), mime.html_7bit(html)
            else:
                text_qp, html_7bit = skeleton.encode(item, self._qp)
                self._encoded += 1
                if self._encoded <= CHECK_ALL or self._encoded % (16 * CHECK_EVERY) == 0:
                    text, html = skeleton.fill(item)
                    expected = self._qp(text), mime.html_7bit(html)
                    if (text_qp, html_7bit) != expected:
                        self._encoding_differs(item)
                        text_qp, html_7bit = expected
            found = _Fragment(text_qp, html_7bit, mime.fits_7bit(html_7bit))
            seen = hash(key)
            if seen in self._seen_items:
                if len(self._fragments) >= FRAGMENT_CACHE_SIZE:
                    self._fragments.popitem(last=False)
                self._fragments[key] = found
            else:
                if len(self._seen_items) >= 16 * FRAGMENT_CACHE_SIZE:
                    self._seen_items.clear()
                self._seen_items.add(seen)
        return found

    def _encoding_differs(self, item: DigestItem) -> None:
        """`_ItemSkeleton.encode` must give exactly what `fill` gives, encoded (it is tested
        to); should a case slip through, say so loudly and render in full from then on."""
        log.error(
            "fast item encoding differs from the templates for %r; rendering in full from "
            "now on (slower, same output; please report this)",
            item.title[:60],
        )
        self.fill_in = False

    def _item_strs(self, item: DigestItem) -> tuple[str, str]:
        """An item's text and HTML. The templates run once per paper with placeholders for
        what depends on the reader's keywords (highlighted title and summary, the "matched"
        line); each (paper, keywords) item then only fills them in."""
        skeleton = self._item_skeleton_for(item)
        if skeleton is None:
            return self._item_text_str(item), self._item_html_str(item)
        return skeleton.fill(item)

    def prepare(self, item: DigestItem) -> None:
        """Make the template skeleton of the item's paper now, ahead of its first email (its
        hits do not matter): what a helper process of `send` does for the window's papers
        while it waits for the index."""
        self._item_skeleton_for(item)

    def _item_skeleton_for(self, item: DigestItem) -> _ItemSkeleton | None:
        """The paper's skeleton, or None when fill-in rendering is off.

        A new skeleton's first fill-in is compared with a full render, so a template that does
        more with the reader's fields than print them (and got past `_fill_in_safe`) turns
        fill-ins off instead of producing a wrong email. Such a template differs on any paper,
        so after the first `CHECK_ALL` papers only one in `CHECK_EVERY` is compared: the
        two extra renders per paper were a fifth of the rendering time of a 5,000-reader run."""
        if not self.fill_in:
            return None
        key = item.paper
        skeleton = self._item_skeletons.get(key)
        if skeleton is not None:
            return skeleton
        if self._mark_around is None:
            self._mark_around = self._marked_wrapper()
            if not self._mark_around:
                self._fill_in_off("email/_marked.html")
                return None
        if len(self._item_skeletons) >= FRAGMENT_CACHE_SIZE:
            self._item_skeletons.clear()
        skeleton = self._item_skeletons[key] = self._item_skeleton(item, *self._mark_around)
        self._skeletons_made += 1
        made = self._skeletons_made
        if (made <= CHECK_ALL or made % CHECK_EVERY == 0) and skeleton.fill(item) != (
            self._item_text_str(item),
            self._item_html_str(item),
        ):
            self._fill_in_off("email/digest_item.*")
            return None
        return skeleton

    def _marked_wrapper(self) -> tuple[str, str] | tuple[()]:
        """What the `marked` macro puts before and after a highlight; () if it does more."""
        slot = self._slots.mark
        marked = self.env.get_template("email/_marked.html").module.marked  # type: ignore[attr-defined]
        before, _, after = str(marked([(slot("hit"), True)])).partition(slot("hit"))
        probe = [("a<&", False), ("b\"'", True), ("c", False)]
        if str(marked(probe)) != f"a&lt;&amp;{before}b&#34;&#39;{after}c":
            return ()
        return before, after

    def _item_skeleton(self, item: DigestItem, before: str, after: str) -> _ItemSkeleton:
        slot = self._slots.mark
        paper = item.paper
        stand_in = _StandIn(
            paper.title,
            paper.link,
            paper.summary,
            paper.truncated,
            paper.published,
            paper.authors,
            paper.source,
            title_parts=[(slot("title"), False)],
            summary_parts=[(slot("summary"), False)],
            matched=[slot("matched")],
            matched_where=slot("where"),
        )
        text = self._slots.split(self._item_text_str(stand_in))
        html = self._slots.split(self._item_html_str(stand_in))
        return _ItemSkeleton.of(text, html, before, after, paper)

    def _frames(self, digest: Digest) -> tuple[tuple[str, str], tuple[str, str]]:
        """(text head, text foot), (html head, html foot): the frame split where items go."""
        skeleton = self._frame_skeleton_for(digest)
        return self._full_frames(digest) if skeleton is None else skeleton.fill(digest)

    def _frame_bytes(self, digest: Digest) -> tuple[bytes, bytes, bytes, bytes]:
        """The frames encoded: text head and foot quoted-printable, html head and foot 7bit."""
        skeleton = self._frame_skeleton_for(digest)
        if skeleton is not None:
            return skeleton.encode(digest, self._qp)
        (text_head, text_foot), (html_head, html_foot) = self._full_frames(digest)
        return (
            self._qp(text_head),
            self._qp(text_foot),
            mime.html_7bit(html_head),
            mime.html_7bit(html_foot),
        )

    def _frame_skeleton_for(self, digest: Digest) -> _FrameSkeleton | None:
        """As with items, the frame templates run once per (item count, day) with placeholders
        for the reader's address, links and first title, and each message fills them in; the
        first fill-in of each frame is checked against a full render. None: render in full."""
        if not self.fill_in or digest.extra:
            return None
        key = (len(digest.items), digest.day)
        skeleton = self._frame_skeletons.get(key)
        fresh = skeleton is None
        if skeleton is None:
            if len(self._frame_skeletons) >= 1000:
                self._frame_skeletons.clear()
            slot = self._slots.mark
            stand_in = dataclasses.replace(
                digest,
                to=slot("to"),
                manage_url=slot("manage_url"),
                unsubscribe_url=slot("unsubscribe_url"),
                unsubscribe_mailto=slot("unsubscribe_mailto"),
            )
            (th, tf), (hh, hf) = self._full_frames(stand_in, preheader=slot("preheader"))
            skeleton = self._frame_skeletons[key] = _FrameSkeleton.of(
                [self._slots.split(s) for s in (th, tf, hh, hf)]
            )
        if fresh and skeleton.fill(digest) != self._full_frames(digest):
            self._fill_in_off("email/digest.*")
            return None
        return skeleton

    def _fill_in_off(self, templates: str) -> None:
        self.fill_in = False
        log.warning(
            "%s: the templates use the reader's fields in a way fill-in rendering cannot "
            "reproduce; rendering every email in full from now on (slower, same output)",
            templates,
        )

    def _full_frames(
        self, digest: Digest, preheader: str | None = None
    ) -> tuple[tuple[str, str], tuple[str, str]]:
        ctx = self.context(digest)
        if preheader is not None:
            ctx["preheader"] = preheader
        text_head, _, text_foot = self._text.render(ctx).partition(_ITEMS)
        html_head, _, html_foot = self._html.render(ctx).partition(_ITEMS)
        return (text_head, text_foot), (html_head, html_foot)

    def bodies(self, digest: Digest) -> tuple[str, str]:
        """Text and HTML as strings, for previews (sending uses the cached encoded fragments)."""
        (text_head, text_foot), (html_head, html_foot) = self._frames(digest)
        text = text_head + "".join(self._item_text_str(i) for i in digest.items) + text_foot
        html = html_head + "".join(self._item_html_str(i) for i in digest.items) + html_foot
        return text, html

    def _item_text_str(self, item: DigestItem | _StandIn) -> str:
        text = self._item_text.render(item=item)
        return text if text.endswith("\n") else text + "\n"

    def _item_html_str(self, item: DigestItem | _StandIn) -> str:
        html = self._item_html.render(item=item)
        return html if html.endswith("\n") else html + "\n"

    def unsubscribe_mailto(self, token: str) -> str:
        # Tokens are URL-safe already (tested): only the space needs quoting.
        subject = (
            "unsubscribe%20" + token
            if _URL_SAFE.fullmatch(token)
            else quote("unsubscribe " + token)
        )
        return f"mailto:unsubscribe@{self.domain}?subject={subject}"

    def render_bytes(self, digest: Digest, *, now: datetime) -> bytes:
        """The complete message, ready for SMTP DATA: a multipart/alternative with the text
        part first and the HTML last (clients show the last part they can)."""
        text_head, text_foot, html_head, html_foot = self._frame_bytes(digest)
        fragments = [self._fragment(item) for item in digest.items]
        fits = (
            all(f.html_fits for f in fragments)
            and mime.fits_7bit(html_head)
            and mime.fits_7bit(html_foot, last=True)
        )
        return self._assemble(
            to=digest.to,
            subject=self.subject(digest),
            message_id=digest.message_id,
            now=now,
            text=[text_head, *(f.text_qp for f in fragments), text_foot],
            html=mime.html_part([html_head, *(f.html for f in fragments), html_foot], fits),
            unsubscribe=(digest.unsubscribe_url, digest.unsubscribe_mailto),
        )

    def message(self, digest: Digest, *, now: datetime) -> EmailMessage:
        """The same message as an object, for previews and tests."""
        return _parse(self.render_bytes(digest, now=now))

    def notice_bytes(self, notice: Notice, *, now: datetime) -> bytes:
        ctx = {
            "base_url": self.settings.base_url.rstrip("/"),
            "contact": self.settings.reply_to or self.sender.addr_spec,
            "postal_address": self.settings.postal_address,
            "to": notice.to,
            **notice.context,
        }
        subject = self.env.get_template(f"email/{notice.kind}_subject.txt").render(ctx)
        text = self.env.get_template(f"email/{notice.kind}.txt").render(ctx)
        html = self.env.get_template(f"email/{notice.kind}.html").render(ctx)
        unsubscribe = None
        if notice.unsubscribe_url and notice.unsubscribe_mailto:
            unsubscribe = (notice.unsubscribe_url, notice.unsubscribe_mailto)
        return self._assemble(
            to=notice.to,
            subject=" ".join(subject.split()),
            message_id=notice.message_id,
            now=now,
            text=[mime.qp(text)],
            html=mime.html_part(
                [html_7bit := mime.html_7bit(html)], mime.fits_7bit(html_7bit, last=True)
            ),
            unsubscribe=unsubscribe,
        )

    def notice_message(self, notice: Notice, *, now: datetime) -> EmailMessage:
        return _parse(self.notice_bytes(notice, now=now))

    def _date_line(self, now: datetime) -> str:
        second = now.replace(microsecond=0)  # what the header shows: a second's emails share it
        cached = self._date  # one read: sender threads share this renderer
        if cached[0] != second:
            cached = self._date = (second, mime.encode_header("Date", format_datetime(second)))
        return cached[1]

    def _assemble(
        self,
        *,
        to: str,
        subject: str,
        message_id: str,
        now: datetime,
        text: Sequence[bytes],
        html: tuple[Sequence[bytes], str],
        unsubscribe: tuple[str, str] | None,
    ) -> bytes:
        """The one place headers are set, so digests and notices carry the same ones."""
        subject_line = self._subject_lines.get(subject)
        if subject_line is None:  # RFC 2047 encoding is slow; a run has a handful of subjects
            if len(self._subject_lines) > 1000:
                self._subject_lines.clear()
            subject_line = self._subject_lines[subject] = mime.encode_header("Subject", subject)
        headers = [
            self._from_header,
            mime.address_list_header("To", [to]),
            subject_line,
            self._date_line(now),
            mime.encode_header("Message-ID", message_id),
            self._fixed_headers,
        ]
        if unsubscribe is not None:
            headers.append(
                mime.address_list_header(
                    "List-Unsubscribe", [f"<{unsubscribe[0]}>", f"<{unsubscribe[1]}>"]
                )
            )
            headers.append(_ONE_CLICK)
        message = mime.assemble(headers, text, html[0], html_encoding=html[1])
        return self._dkim.sign(message) if self._dkim is not None else message


def _parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=SMTP)
    assert isinstance(msg, EmailMessage)
    return msg


class _Fragment(NamedTuple):
    """Only the encoded bytes are kept: memory, not time, bounds this cache. (A tuple: one
    is made per new item of every digest, and a frozen dataclass costs twice as much.)"""

    text_qp: bytes
    html: bytes  # mime.html_7bit
    html_fits: bool  # mime.fits_7bit


# RFC 8058's header, the same on every message that can be unsubscribed from: encoded once.
_ONE_CLICK = mime.encode_header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")
# Where the items go in a frame template; split out after rendering.
_ITEMS = Markup("\x00items\x00")
FRAGMENT_CACHE_SIZE = 4_096  # about 5 KB each; fill-in rendering makes a miss cheap
CHECK_ALL = 64  # new paper skeletons compared with a full render, then one in CHECK_EVERY
CHECK_EVERY = 16


# What fill-in rendering replaces with placeholders, by template variable.
_READER_FIELDS = {
    "digest": frozenset({"to", "manage_url", "unsubscribe_url", "unsubscribe_mailto"}),
    "item": frozenset({"title_parts", "summary_parts", "matched", "matched_where"}),
    "preheader": frozenset(),
}


def _fill_in_safe(env: Environment) -> bool:
    """Whether the email templates only *print* the reader's fields: ``{{ digest.to }}``,
    ``{{ item.matched | join(", ") }}``, ``{{ marked(item.title_parts) }}``. A template that
    branches on one, filters it otherwise or passes `digest` or `item` around as a whole
    cannot be filled in from placeholders, so such templates are rendered in full."""
    for name in env.list_templates(filter_func=lambda n: n.startswith("email/")):
        if name.endswith(("_subject.txt",)) or not name.startswith(("email/digest", "email/_")):
            continue
        loader = env.loader
        assert loader is not None
        tree = env.parse(loader.get_source(env, name)[0])
        printed: set[int] = set()
        for output in tree.find_all(nodes.Output):
            for node in output.nodes:
                if isinstance(node, nodes.Filter) and node.name == "join" and node.node:
                    node = node.node
                if (
                    isinstance(node, nodes.Call)
                    and isinstance(node.node, nodes.Name)
                    and node.node.name == "marked"
                    and len(node.args) == 1
                ):
                    node = node.args[0]
                printed.add(id(node))
        if not _only_printed(tree, printed, inside_getattr=False):
            return False
    return True


def _only_printed(node: nodes.Node, printed: set[int], *, inside_getattr: bool) -> bool:
    if isinstance(node, nodes.Name) and node.name in _READER_FIELDS:
        if node.name == "preheader":
            return id(node) in printed
        return inside_getattr  # `digest` or `item` handed on whole: cannot tell
    if isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name):
        fields = _READER_FIELDS.get(node.node.name)
        if fields is not None and node.attr in fields and id(node) not in printed:
            return False
    if (
        isinstance(node, nodes.Getitem)
        and isinstance(node.node, nodes.Name)
        and node.node.name in _READER_FIELDS
    ):
        return False
    return all(
        _only_printed(child, printed, inside_getattr=isinstance(node, nodes.Getattr))
        for child in node.iter_child_nodes()
    )


class _Slots:
    """Placeholders that cannot occur in real input: control characters around a random
    token, so not even a hostile feed can forge one."""

    def __init__(self) -> None:
        token = secrets.token_hex(6)
        self._pattern = re.compile(f"\x02{token}:(\\w+)\x03")
        self._token = token

    def mark(self, name: str) -> str:
        return f"\x02{self._token}:{name}\x03"

    def split(self, rendered: str) -> list[str]:
        """Literal text at even indexes, placeholder names at odd ones."""
        return self._pattern.split(rendered)


_HTML_SPECIAL = re.compile("[&<>'\"]")


def _escape(text: str) -> str:
    """markupsafe's escaping (the one autoescape applies), as plain str replacements: the
    same output without a Markup object per call (tested against markupsafe)."""
    if _HTML_SPECIAL.search(text) is None:
        return text
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&#39;")
        .replace('"', "&#34;")
    )


@dataclass(frozen=True, slots=True)
class _FrameSkeleton:
    text_head: list[str]
    text_foot: list[str]
    html_head: list[str]
    html_foot: list[str]
    text_encoded: tuple[mime.QPTemplate, mime.QPTemplate]  # head, foot

    @classmethod
    def of(cls, pieces: Sequence[list[str]]) -> _FrameSkeleton:
        text_head, text_foot, html_head, html_foot = pieces
        text = (mime.QPTemplate(text_head), mime.QPTemplate(text_foot))
        return cls(text_head, text_foot, html_head, html_foot, text)

    @staticmethod
    def _values(digest: Digest) -> tuple[dict[str, str], dict[str, str]]:
        raw = {
            "to": digest.to,
            "manage_url": digest.manage_url,
            "unsubscribe_url": digest.unsubscribe_url,
            "unsubscribe_mailto": digest.unsubscribe_mailto,
            "preheader": digest.items[0].title if digest.items else "",
        }
        return raw, {name: _escape(value) for name, value in raw.items()}

    def fill(self, digest: Digest) -> tuple[tuple[str, str], tuple[str, str]]:
        raw, html = self._values(digest)
        return (
            (mime.fill(self.text_head, raw), mime.fill(self.text_foot, raw)),
            (mime.fill(self.html_head, html), mime.fill(self.html_foot, html)),
        )

    def encode(self, digest: Digest, lines: mime.QPLines) -> tuple[bytes, bytes, bytes, bytes]:
        raw, html = self._values(digest)
        text_head, text_foot = self.text_encoded
        return (
            text_head.encode(raw, lines),
            text_foot.encode(raw, lines),
            mime.html_7bit(mime.fill(self.html_head, html)),
            mime.html_7bit(mime.fill(self.html_foot, html)),
        )


class _ItemSkeleton:
    """A paper's item templates, rendered once with placeholders for the reader's fields
    (highlighted title and summary, the keywords that matched and where), ready to be filled
    in. `encode` is the per-email path: the HTML's literal pieces are 7bit-encoded here, once,
    so each fill-in encodes only what it puts in the holes."""

    def __init__(
        self,
        text: list[str],
        html: list[str],
        mark_before: str,
        mark_after: str,
        paper: ShownPaper,
    ) -> None:
        self.text = text
        self.html = html
        self.text_encoded = mime.QPTemplate(text)
        self.mark_before = mark_before  # what the `marked` macro puts around a highlight
        self.mark_after = mark_after
        self.paper = paper
        # Highlights are cut from the paper's title and summary: when those have nothing to
        # escape, neither has any piece, and the per-piece escaping goes.
        self.escape_title = _HTML_SPECIAL.search(paper.title) is not None
        self.escape_summary = _HTML_SPECIAL.search(paper.summary) is not None
        # A CR next to a hole could pair with a LF in its value, which html_7bit reads as one
        # line break: encode such templates whole. Jinja leaves no CR in a template's text.
        # The literal pieces are encoded, with an empty stand-in where each hole goes.
        self.html_encoded: list[bytes] | None = None
        if not any("\r" in piece for piece in html[::2]):
            self.html_encoded = [b"" if i % 2 else mime.html_7bit(p) for i, p in enumerate(html)]
        # Highlighted titles by keywords, as text and encoded.
        self._titles: dict[tuple[str, ...], tuple[str, bytes]] = {}

    @classmethod
    def of(
        cls, text: list[str], html: list[str], before: str, after: str, paper: ShownPaper
    ) -> _ItemSkeleton:
        return cls(text, html, before, after, paper)

    def _cut(self, text: str, marks: Marks, escape: bool) -> str:
        """`text` with the `marked` macro's markup around each of the `marks`."""
        if not marks:
            return _escape(text) if escape else text
        before, after = self.mark_before, self.mark_after
        out: list[str] = []
        cursor = 0
        for start, end in marks:
            out += (text[cursor:start], before, text[start:end], after)
            cursor = end
        out.append(text[cursor:])
        if escape:
            out[::4] = map(_escape, out[::4])
            out[2::4] = map(_escape, out[2::4])
        return "".join(out)

    def _marked(self, parts: Sequence[tuple[str, bool]], escape: bool) -> str:
        if isinstance(parts, Marked):
            return self._cut(parts.text, parts.marks, escape)
        before, after = self.mark_before, self.mark_after
        if escape:
            return "".join(
                f"{before}{_escape(text)}{after}" if hit else _escape(text) for text, hit in parts
            )
        return "".join(f"{before}{text}{after}" if hit else text for text, hit in parts)

    def fill(self, item: DigestItem) -> tuple[str, str]:
        """The item's text and HTML, as strings (previews and the fill-in checks)."""
        matched = ", ".join(item.matched)
        text = {"matched": matched, "where": item.matched_where}
        html = {
            "title": self._marked(item.title_parts, self.escape_title),
            "summary": self._marked(item.summary_parts, self.escape_summary),
            "matched": _escape(matched),
            "where": _escape(item.matched_where),
        }
        return mime.fill(self.text, text), mime.fill(self.html, html)

    def encode(self, item: DigestItem, lines: mime.QPLines) -> tuple[bytes, bytes]:
        """The item's text (quoted-printable) and HTML (7bit), made from its hits directly:
        what `fill` gives, encoded (tested), in a fraction of the steps. Most items of a run
        are new (a reader's own mix of keywords for a paper), so this runs for most items of
        most emails; what they share (the facts of a set of hits, a paper's title as
        highlighted for a set of keywords) is looked up rather than made again."""
        facts = _hit_facts(item.hits)
        paper = self.paper
        highlighter = item.highlighter
        text = self.text_encoded.encode(facts.text, lines)
        found = self._titles.get(facts.in_title)
        if found is None:  # a few variants per paper: most readers see one of them
            if len(self._titles) >= 64:
                self._titles.clear()
            cut = self._cut(
                paper.title, highlighter.marks(paper.title, facts.in_title), self.escape_title
            )
            found = self._titles[facts.in_title] = (cut, mime.html_7bit(cut))
        title, title_html = found
        summary = self._cut(
            paper.summary_lines,
            highlighter.marks(paper.summary, facts.in_summary),
            self.escape_summary,
        )
        if self.html_encoded is None or "\r" in title:  # (see html_encoded)
            values = {
                "title": title,
                "summary": summary,
                "matched": _escape(facts.text["matched"]),
                "where": facts.where,
            }
            return text, mime.html_7bit(mime.fill(self.html, values))
        encoded = {
            "title": title_html,
            "summary": mime.html_7bit(summary),
            "matched": facts.matched_html,
            "where": facts.where_html,
        }
        out = self.html_encoded.copy()
        out[1::2] = [encoded[hole] for hole in self.html[1::2]]
        return text, b"".join(out)


class _HitFacts(NamedTuple):
    """What an item's encoding needs from its hits alone, whatever the paper."""

    # The keywords to highlight in the title and in the summary, by the matcher's rules: a
    # keyword the pick says is not in a field is not looked for there; one that does not say
    # (a flag of None) is looked for.
    in_title: tuple[str, ...]
    in_summary: tuple[str, ...]
    text: Mapping[str, str]  # the text template's values (matched, where); shared: read only
    where: str
    matched_html: bytes  # the matched keywords, escaped and 7bit-encoded
    where_html: bytes


@functools.lru_cache(maxsize=1024)
def _hit_facts(hits: tuple[ItemHit, ...]) -> _HitFacts:
    """Cached: readers whose keywords match a paper the same way share hits, and working
    these out was a sixth of encoding an item. 53% of the items of a benchmark run find their
    facts here with 1,024 kept, 60% with 16,384: the common mixes recur."""
    # Lists, not generators: a miss is on the path of most new items, and the generators'
    # set-up was a sixth of it (3.3 to 2.7 µs, timeit).
    matched = ", ".join([h[0] for h in hits])
    where = _WHERE[2 * any([h[1] for h in hits]) + any([h[2] for h in hits])]
    return _HitFacts(
        in_title=tuple([h[0] for h in hits if h[1] is not False]),
        in_summary=tuple([h[0] for h in hits if h[2] is not False]),
        text={"matched": matched, "where": where},
        where=where,
        matched_html=mime.html_7bit(_escape(matched)),
        where_html=_WHERE_HTML[where],
    )
