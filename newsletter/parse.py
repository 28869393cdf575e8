"""Turn feed bytes into normalized, sanitized entries.

feedparser does the parsing (RSS 0.9x/1.0/2.0, Atom, broken XML recovery, dates, encodings);
this module decides what an entry *is* for the digest: a stable id, plain-text title, safe HTML
and plain-text summary, an http(s) link and a UTC date.

feedparser's own HTML sanitizer and relative-URI resolver are turned off: both re-parse every
HTML field in pure Python, while nh3 (in `newsletter.sanitize`) does both in one native pass.
"""

from __future__ import annotations

import hashlib
import html
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import feedparser

from newsletter.sanitize import clean_html, html_to_text, safe_link, sanitized_to_text

__all__ = ["MAX_ENTRIES", "EntryData", "FeedParseError", "ParsedFeed", "parse_feed"]

MAX_ENTRIES = 20_000  # memory is bounded by fetch_max_bytes; this bounds work per feed
MAX_TITLE_CHARS = 1000
MAX_GUID_CHARS = 512  # the width of entries.guid
# Far beyond any abstract; stops a hostile entry from making the sanitizer chew megabytes.
MAX_SUMMARY_CHARS = 100_000
MAX_AUTHORS = 200
MAX_CATEGORIES = 100
MAX_NAME_CHARS = 300

# arXiv prefixes every description with "arXiv:2401.01234v1 Announce Type: new Abstract:"
# (the id is absent in some mirrors; the type may be new, cross, replace, replace-cross).
# Leading tags are kept (group 1) so that stripping never unbalances the markup.
_ARXIV_PREAMBLE_RE = re.compile(
    r"(\s*(?:<[^<>]*>\s*)*)"
    r"(?:arXiv:\s*[^\s<]+\s+)?"
    r"Announce\s+Type:\s*[\w-]+\s*"
    r"(?:<[^<>]*>\s*)*"
    r"(?:Abstract:\s*)?",
    re.IGNORECASE,
)
# Leftovers of a double-escaped title ("Schr&amp;ouml;dinger" arrives as "Schr&ouml;dinger").
_STILL_ESCAPED_RE = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")
_HTML_DOC_RE = re.compile(
    rb"^(?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*"
    rb"<(?:!doctype\s+html|html|head|body)\b",
    re.IGNORECASE | re.DOTALL,
)
_XML_DECLARATION_RE = re.compile(rb"^(?:\xef\xbb\xbf)?<\?xml")

# feedparser flags these on perfectly usable feeds (e.g. any feed served as text/xml without a
# charset); reporting them would teach admins to ignore warnings.
_HARMLESS_BOZO = (
    feedparser.CharacterEncodingOverride,
    feedparser.NonXMLContentType,
    feedparser.UndeclaredNamespace,
)
_HTML_TYPES = ("text/html", "application/xhtml+xml")

# FeedParserDict.get resolves key aliases in Python on every call; the canonical keys read here
# are stored under their own names, so the plain dict lookup returns the same value faster.
_get = dict.get


@dataclass(frozen=True, slots=True)
class EntryData:
    guid: str
    title: str
    summary_html: str
    summary_text: str
    link: str | None
    authors: tuple[str, ...]
    categories: tuple[str, ...]
    published: datetime | None


@dataclass(frozen=True, slots=True)
class ParsedFeed:
    title: str | None
    entries: tuple[EntryData, ...]
    warning: str | None


_CHAR_REF_RE = re.compile(rb"&#([xX][0-9a-fA-F]{1,8}|[0-9]{1,10});")


def _replace_surrogate_ref(match: re.Match[bytes]) -> bytes:
    ref = match.group(1)
    code = int(ref[1:], 16) if ref[:1] in (b"x", b"X") else int(ref)
    return b"&#xFFFD;" if 0xD800 <= code <= 0xDFFF else match.group(0)


_UNWANTED_CHARS_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


class FeedParseError(ValueError):
    """The bytes are not a usable feed; the message says what they are and what to check."""


def parse_feed(
    data: bytes, *, base_url: str | None = None, content_type: str | None = None
) -> ParsedFeed:
    """Parse a feed document; raise FeedParseError when nothing usable can be recovered.

    `base_url` (where the bytes came from) resolves relative links; `content_type` (the HTTP
    header, charset included) helps decoding and explains failures.
    """
    headers: dict[str, str] = {}
    if content_type:
        headers["content-type"] = content_type
    if base_url:
        headers["content-location"] = base_url
    # A reference to a lone UTF-16 surrogate (&#xD800;) makes feedparser's loose parser raise
    # while encoding; such a character cannot be stored or mailed anyway.
    if b"&#" in data:
        data = _CHAR_REF_RE.sub(_replace_surrogate_ref, data)
    # A BytesIO, never the raw bytes: feedparser would treat a short string that looks like a
    # path or URL as something to open or download.
    try:
        result = feedparser.parse(
            io.BytesIO(data),
            response_headers=headers,
            sanitize_html=False,
            resolve_relative_uris=False,
        )
    except Exception as failure:  # feedparser's own bugs must not end the fetch of every feed
        raise FeedParseError(f"the feed parser failed on this document: {failure!r}") from None
    raw_entries: list[Any] = result.get("entries") or []
    exc = result.get("bozo_exception") if result.get("bozo") else None
    if not raw_entries:
        _raise_or_accept_empty(data, result, exc, content_type)

    entries, seen = [], set()
    for raw in raw_entries[:MAX_ENTRIES]:
        entry = _entry(raw, base_url)
        if entry is not None and entry.guid not in seen:
            seen.add(entry.guid)
            entries.append(entry)

    warnings = []
    if exc is not None and not isinstance(exc, _HARMLESS_BOZO):
        warnings.append(f"{_describe(exc, data)} (kept {len(entries)} entries)")
    if len(raw_entries) > MAX_ENTRIES:
        warnings.append(f"feed has {len(raw_entries)} entries; kept only the first {MAX_ENTRIES}")
    feed_info: Mapping[str, Any] = result.get("feed") or {}
    feed_title = _title(feed_info.get("title_detail"), feed_info.get("title"))
    return ParsedFeed(
        title=feed_title or None,
        entries=tuple(entries),
        warning="; ".join(warnings) or None,
    )


def _raise_or_accept_empty(
    data: bytes, result: Mapping[str, Any], exc: BaseException | None, content_type: str | None
) -> None:
    """Tell a genuinely empty feed apart from something that is not a feed at all."""
    version = result.get("version")
    if version and exc is None:
        return  # a valid feed that currently has no entries
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    head = data[:2048]
    if not data.strip():
        raise FeedParseError("not a feed: the document is empty; check the URL")
    if mime == "text/html" or _HTML_DOC_RE.match(head):
        served = f" ({mime})" if mime else ""
        raise FeedParseError(
            f"not a feed: the server sent an HTML page{served}; check the URL "
            "(the page may link to the real RSS/Atom feed)"
        )
    if head.lstrip().startswith((b"{", b"[")):
        raise FeedParseError(
            "not a feed: this is JSON, not RSS or Atom (JSON Feed is not supported); "
            "use the site's RSS or Atom URL"
        )
    if exc is not None and version:
        raise FeedParseError(
            f"broken feed: {_describe(exc, data)}, and no entries could be recovered; "
            "the server may have sent a truncated response"
        )
    if exc is not None:
        raise FeedParseError(
            f"not a feed: {_describe(exc, data)}; check that the URL points to an RSS or Atom feed"
        )
    raise FeedParseError(
        "not a feed: the document is XML but neither RSS nor Atom; "
        "check that the URL points to the feed itself"
    )


def _describe(exc: BaseException, data: bytes) -> str:
    get_line = getattr(exc, "getLineNumber", None)
    get_message = getattr(exc, "getMessage", None)
    if callable(get_line) and callable(get_message):
        line = int(get_line())
        # feedparser prepends an XML declaration line when the document has none.
        if not _XML_DECLARATION_RE.match(data) and line > 1:
            line -= 1
        return f"broken XML at line {line}: {get_message()}"
    return str(exc) or type(exc).__name__


def _entry(raw: dict[str, Any], feed_base: str | None) -> EntryData | None:
    title = _title(_get(raw, "title_detail"), _get(raw, "title"))
    detail = _get(raw, "summary_detail")
    if not detail or not _get(detail, "value"):
        contents = _get(raw, "content")
        detail = contents[0] if contents else None
    summary_html, summary_text = _summary(detail, feed_base)
    if not title and not summary_text:
        return None

    title, summary_html, summary_text = _scrub(title), _scrub(summary_html), _scrub(summary_text)
    link = safe_link(_get(raw, "link"))
    guid = _scrub(_get(raw, "id") or "").strip()
    if len(guid) > MAX_GUID_CHARS:
        guid = "sha256:" + hashlib.sha256(guid.encode("utf-8", "replace")).hexdigest()
    if not guid:
        guid = link or _content_hash(title, summary_text)
    authors = _get(raw, "authors")
    tags = _get(raw, "tags")
    return EntryData(
        guid=guid,
        title=title,
        summary_html=summary_html,
        summary_text=summary_text,
        link=link,
        authors=_names(
            (_get(a, "name") or _get(a, "email") for a in authors)
            if authors
            else (_get(raw, "author"),),
            MAX_AUTHORS,
        ),
        categories=_names(
            (_get(t, "term") or _get(t, "label") for t in tags) if tags else (), MAX_CATEGORIES
        ),
        published=_utc(_get(raw, "published_parsed") or _get(raw, "updated_parsed")),
    )


def _scrub(text: str) -> str:
    """Drop NUL, other control characters and lone surrogates (from character references):
    PostgreSQL refuses NUL in text, and none of them belongs in an email."""
    if _UNWANTED_CHARS_RE.search(text):
        return _UNWANTED_CHARS_RE.sub("", text)
    return text


def _content_hash(title: str, summary_text: str) -> str:
    digest = hashlib.sha256(f"{title}\x00{summary_text}".encode()).hexdigest()
    return f"sha256:{digest}"


def _is_html(detail: dict[str, Any] | None) -> bool:
    if not detail:
        return False
    return str(_get(detail, "type") or "").lower() in _HTML_TYPES


def _title(detail: dict[str, Any] | None, value: Any) -> str:
    if not value or not isinstance(value, str):
        return ""
    text = value
    if _is_html(detail) or ("&" in text and _STILL_ESCAPED_RE.search(text)):
        text = html_to_text(text)
        # A title escaped twice still shows entities or tags after one pass.
        if ("&" in text and _STILL_ESCAPED_RE.search(text)) or "</" in text:
            text = html_to_text(text)
    else:
        text = " ".join(text.split())
    if len(text) > MAX_TITLE_CHARS:
        text = text[: MAX_TITLE_CHARS - 1].rstrip() + "…"
    return text


def _summary(detail: dict[str, Any] | None, feed_base: str | None) -> tuple[str, str]:
    if not detail:
        return "", ""
    value = _get(detail, "value")
    if not value or not isinstance(value, str):
        return "", ""
    value = value[:MAX_SUMMARY_CHARS]
    match = _ARXIV_PREAMBLE_RE.match(value)
    if match:
        value = match.group(1) + value[match.end() :]
    if ("<" in value or "&" in value) and _is_html(detail):
        cleaned = clean_html(value, base_url=_get(detail, "base") or feed_base)
        return cleaned, sanitized_to_text(cleaned)
    # Plain text, or "HTML" without a single tag or entity: no parser needed.
    text = " ".join(value.split())
    return html.escape(text, quote=False), text


def _names(values: Iterable[Any], limit: int) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for value in values:
        if not value or not isinstance(value, str):
            continue
        name = _scrub(html_to_text(value))[:MAX_NAME_CHARS].strip()
        if name:
            out.setdefault(name, None)
            if len(out) >= limit:
                break
    return tuple(out)


def _utc(parsed: Any) -> datetime | None:
    """feedparser already converted the date to a UTC struct_time; make it an aware datetime."""
    if not parsed:
        return None
    try:
        # min(): a leap second (:60) is valid in a feed but not in a datetime.
        p = parsed
        return datetime(p[0], p[1], p[2], p[3], p[4], min(p[5], 59), tzinfo=UTC)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
