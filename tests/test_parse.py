"""parse_feed() on the real fixtures and on small hand-written feeds for each rule."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from newsletter import parse
from newsletter.parse import EntryData, FeedParseError, ParsedFeed, parse_feed

DATA = Path(__file__).parent / "data"
FEEDS = DATA / "feeds"
RSS = (DATA / "daily-papers.rss.xml").read_bytes()
ATOM = (DATA / "daily-papers.atom.xml").read_bytes()
PAPERS = json.loads((DATA / "daily-papers.json").read_text("utf-8"))


def rss(items: str, *, channel: str = "<title>T</title>") -> bytes:
    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n<rss version="2.0"><channel>{channel}\n'
        f"{items}\n</channel></rss>"
    ).encode()


def one(items: str, **kwargs: str) -> EntryData:
    (entry,) = parse_feed(rss(items), **kwargs).entries
    return entry


# --- the real fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rss_feed() -> ParsedFeed:
    return parse_feed(RSS, content_type="application/rss+xml")


@pytest.fixture(scope="module")
def atom_feed() -> ParsedFeed:
    return parse_feed(ATOM, content_type="application/atom+xml")


def test_rss_and_atom_fixtures_agree(rss_feed: ParsedFeed, atom_feed: ParsedFeed) -> None:
    assert len(rss_feed.entries) == len(atom_feed.entries) == len(PAPERS) == 44
    assert [e.guid for e in rss_feed.entries] == [e.guid for e in atom_feed.entries]
    assert [e.title for e in rss_feed.entries] == [p["title"] for p in PAPERS]
    assert [e.title for e in atom_feed.entries] == [p["title"] for p in PAPERS]
    assert [e.link for e in rss_feed.entries] == [e.link for e in atom_feed.entries]
    assert [e.published for e in rss_feed.entries] == [e.published for e in atom_feed.entries]
    assert rss_feed.title == atom_feed.title == "Daily Papers"
    assert rss_feed.warning is None and atom_feed.warning is None
    assert len({e.guid for e in rss_feed.entries}) == 44


def test_arxiv_preamble_is_stripped_from_the_fixture(
    rss_feed: ParsedFeed, atom_feed: ParsedFeed
) -> None:
    for entry, atom_entry, paper in zip(rss_feed.entries, atom_feed.entries, PAPERS, strict=True):
        assert "Announce Type" not in entry.summary_text
        assert not entry.summary_text.startswith("Abstract")
        assert entry.summary_text == " ".join(paper["abstract"].split())
        assert entry.summary_text == atom_entry.summary_text


def test_schrodinger_survives_as_unicode(rss_feed: ParsedFeed, atom_feed: ParsedFeed) -> None:
    for feed in (rss_feed, atom_feed):
        assert "Light Schrödinger Bridge" in [e.title for e in feed.entries]


def test_fixture_dates_are_aware_utc(rss_feed: ParsedFeed) -> None:
    first = rss_feed.entries[0]
    assert first.published == datetime(2021, 11, 25, tzinfo=UTC)
    assert all(e.published and e.published.tzinfo is UTC for e in rss_feed.entries)


def test_fixture_authors(atom_feed: ParsedFeed) -> None:
    assert atom_feed.entries[0].authors == ("4 authors",)


# --- arXiv-style feed ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arxiv() -> ParsedFeed:
    return parse_feed((FEEDS / "arxiv-style.rss.xml").read_bytes())


def test_arxiv_preamble_variants(arxiv: ParsedFeed) -> None:
    assert [e.summary_text for e in arxiv.entries] == [
        "We show that $x<y$ implies $a<b$ for all n > 2, improving on earlier work.",
        "Cross-listed abstract.",
        "Replaced abstract.",
        "No id here.",
        "Marked-up abstract.",
    ]
    assert arxiv.entries[4].summary_html == "<p>Marked-up <em>abstract</em>.</p>"


def test_arxiv_entry_fields(arxiv: ParsedFeed) -> None:
    entry = arxiv.entries[0]
    assert entry.guid == "oai:arXiv.org:2401.01234v1"
    assert entry.title == "Bounds for Schrödinger operators when n<k"
    assert entry.link == "https://arxiv.org/abs/2401.01234"
    assert entry.categories == ("cs.LG", "math.AP")
    assert entry.authors == ("Ada Lovelace, Alan Turing",)
    assert entry.published == datetime(2024, 1, 8, 5, 0, tzinfo=UTC)  # -0500 -> UTC
    assert "$x&lt;y$" in entry.summary_html  # maths is escaped text, not a swallowed tag


# --- hostile content -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile() -> ParsedFeed:
    return parse_feed((FEEDS / "hostile.atom.xml").read_bytes())


def test_hostile_entry_is_sanitized(hostile: ParsedFeed) -> None:
    entry = hostile.entries[0]
    html = entry.summary_html.lower()
    for bad in (
        "<script", "document.cookie", "<style", "display: none", "<img", "tracker", "<iframe",
        "<form", "<input", "sign in", "javascript", "data:", "onclick", "onerror",
    ):  # fmt: skip
        assert bad not in html, bad
        assert bad not in entry.summary_text.lower(), bad
    # The relative link is resolved against the feed's xml:base and marked up safely.
    assert (
        '<a href="https://blog.example.org/posts/paper.pdf" rel="noopener noreferrer nofollow">'
        in entry.summary_html
    )
    assert entry.summary_text == "Read the paper or this or that."
    assert entry.link is None  # javascript: entry link
    assert entry.title == "Light Schrödinger Bridge"  # script dropped, entities decoded
    assert entry.authors == ("Eve Hacker",)
    assert hostile.title == "Hostile feed"


def test_xhtml_title_relative_link_and_plain_text_summary(hostile: ParsedFeed) -> None:
    entry = hostile.entries[1]
    assert entry.title == "Inline XHTML title"
    assert entry.link == "https://blog.example.org/posts/second-post"
    assert entry.summary_text == "Plain text with <angle> brackets & an ampersand."
    assert entry.summary_html == "Plain text with &lt;angle&gt; brackets &amp; an ampersand."
    assert entry.published == datetime(2024, 3, 1, 4, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    "title",
    [
        "<title>Light Schr&amp;ouml;dinger &lt;i&gt;Bridge&lt;/i&gt;</title>",
        "<title>Light Schr&#246;dinger   Bridge\n</title>",
        "<title><![CDATA[Light Schr&ouml;dinger <i>Bridge</i>]]></title>",
        "<title>Light Schr&amp;amp;ouml;dinger Bridge</title>",  # escaped twice
    ],
)
def test_title_markup_and_entities_become_plain_text(title: str) -> None:
    assert one(f"<item>{title}<description>x</description></item>").title == (
        "Light Schrödinger Bridge"
    )


def test_long_title_is_truncated() -> None:
    title = "word " * 1000
    entry = one(f"<item><title>{title}</title></item>")
    assert len(entry.title) <= parse.MAX_TITLE_CHARS
    assert entry.title.startswith("word word")


@pytest.mark.parametrize(
    "link",
    ["javascript:alert(1)", "data:text/html,x", "vbscript:x", "ftp://example.org/x", "  "],
)
def test_unsafe_entry_links_become_none(link: str) -> None:
    assert one(f"<item><title>t</title><link>{link}</link></item>").link is None


def test_relative_entry_link_uses_base_url() -> None:
    entry = one(
        "<item><title>t</title><link>/papers/1</link>"
        '<description>&lt;a href="pdf/1"&gt;pdf&lt;/a&gt;</description></item>',
        base_url="https://example.org/feeds/all.xml",
    )
    assert entry.link == "https://example.org/papers/1"
    assert 'href="https://example.org/feeds/pdf/1"' in entry.summary_html


# --- ids, duplicates, dropping ---------------------------------------------------------------


def test_missing_ids_fall_back_to_link_then_to_a_content_hash() -> None:
    items = (
        "<item><guid>  urn:x:1 </guid><title>A</title><link>https://e.org/a</link></item>"
        "<item><title>B</title><link>https://e.org/b</link></item>"
        "<item><title>C</title><description>c text</description></item>"
        "<item><title>D</title><description>d text</description></item>"
    )
    entries = parse_feed(rss(items)).entries
    assert [e.guid for e in entries[:2]] == ["urn:x:1", "https://e.org/b"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", entries[2].guid)
    assert entries[2].guid != entries[3].guid
    assert parse_feed(rss(items)).entries[2].guid == entries[2].guid  # stable across runs


def test_duplicate_ids_are_collapsed_first_wins() -> None:
    items = (
        "<item><guid>dup</guid><title>first</title></item>"
        "<item><guid>other</guid><title>middle</title></item>"
        "<item><guid>dup</guid><title>second</title></item>"
        "<item><title>no id</title><link>https://e.org/x</link></item>"
        "<item><title>no id again</title><link>https://e.org/x</link></item>"
    )
    entries = parse_feed(rss(items)).entries
    assert [(e.guid, e.title) for e in entries] == [
        ("dup", "first"),
        ("other", "middle"),
        ("https://e.org/x", "no id"),
    ]


def test_entries_without_title_and_summary_are_dropped() -> None:
    items = (
        "<item><guid>1</guid><link>https://e.org/1</link></item>"
        "<item><guid>2</guid><title> </title><description>&lt;img src=x&gt;</description></item>"
        "<item><guid>3</guid><description>only a summary</description></item>"
    )
    entries = parse_feed(rss(items)).entries
    assert [(e.guid, e.title, e.summary_text) for e in entries] == [("3", "", "only a summary")]


def test_entry_count_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parse, "MAX_ENTRIES", 3)
    items = "".join(f"<item><guid>{i}</guid><title>t{i}</title></item>" for i in range(10))
    feed = parse_feed(rss(items))
    assert [e.guid for e in feed.entries] == ["0", "1", "2"]
    assert feed.warning == "feed has 10 entries; kept only the first 3"


# --- dates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("<pubDate>Thu, 25 Nov 2021 10:00:00 +0200</pubDate>", datetime(2021, 11, 25, 8, 0)),
        ("<pubDate>Thu, 25 Nov 2021 22:30:00 -0300</pubDate>", datetime(2021, 11, 26, 1, 30)),
        ("<pubDate>Thu, 25 Nov 2021 10:00:00 GMT</pubDate>", datetime(2021, 11, 25, 10, 0)),
        ("<dc:date>2024-01-02T03:04:05-05:00</dc:date>", datetime(2024, 1, 2, 8, 4, 5)),
        ("<pubDate>not a date</pubDate>", None),
        ("", None),
    ],
)
def test_dates_are_converted_to_utc(fields: str, expected: datetime | None) -> None:
    doc = (
        '<?xml version="1.0"?><rss version="2.0" xmlns:dc="http://purl.org/dc/elements/1.1/">'
        f"<channel><title>T</title><item><title>t</title>{fields}</item></channel></rss>"
    ).encode()
    (entry,) = parse_feed(doc).entries
    assert entry.published == (expected.replace(tzinfo=UTC) if expected else None)


def test_atom_published_wins_over_updated_which_is_the_fallback() -> None:
    doc = b"""<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom"><title>T</title>
    <entry><id>1</id><title>a</title><published>2024-01-01T00:00:00Z</published>
      <updated>2024-06-01T00:00:00Z</updated></entry>
    <entry><id>2</id><title>b</title><updated>2024-06-01T12:00:00+01:00</updated></entry>
    </feed>"""
    a, b = parse_feed(doc).entries
    assert a.published == datetime(2024, 1, 1, tzinfo=UTC)
    assert b.published == datetime(2024, 6, 1, 11, 0, tzinfo=UTC)


# --- not feeds, broken feeds -----------------------------------------------------------------


def test_html_page_is_not_a_feed() -> None:
    page = (FEEDS / "not-a-feed.html").read_bytes()
    with pytest.raises(FeedParseError, match=r"HTML page \(text/html\); check the URL"):
        parse_feed(page, content_type="text/html; charset=utf-8")
    with pytest.raises(FeedParseError, match="HTML page"):
        parse_feed(page)  # sniffed without a content type


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the document is empty"),
        (b"  \n ", "the document is empty"),
        (b'{"version": "https://jsonfeed.org/version/1.1", "items": []}', "JSON"),
        (b"<?xml version='1.0'?><catalog><book/></catalog>", "neither RSS nor Atom"),
        (b"\x00\x01binary junk", "not a feed: broken XML at line 1"),
        (b"/etc/passwd", "not a feed"),  # must not be opened as a path by feedparser
        (
            b"<?xml version='1.0'?>\n<rss version='2.0'><channel><title>T</ti",
            "broken feed: broken XML at line 2",
        ),
    ],
)
def test_unusable_documents_raise(data: bytes, message: str) -> None:
    with pytest.raises(FeedParseError, match=re.escape(message)):
        parse_feed(data)


def test_valid_feed_without_entries_is_fine() -> None:
    feed = parse_feed(rss(""))
    assert feed == ParsedFeed(title="T", entries=(), warning=None)


def test_broken_xml_with_entries_returns_them_with_a_warning() -> None:
    feed = parse_feed((FEEDS / "broken.rss.xml").read_bytes())
    assert [e.title for e in feed.entries] == ["First", "Second bold", "Third"]
    assert feed.warning == "broken XML at line 6: mismatched tag (kept 3 entries)"
    assert feed.title == "Half-broken feed"


def test_line_numbers_count_from_the_real_first_line_without_a_declaration() -> None:
    doc = b"<rss version='2.0'><channel><title>T</title>\n<item><title>A</title></item>\n<b></rss>"
    feed = parse_feed(doc)
    assert feed.warning is not None and feed.warning.startswith("broken XML at line 3:")


def test_harmless_content_type_quirks_do_not_warn() -> None:
    for content_type in ("text/xml", "text/html", "application/octet-stream", "text/plain"):
        feed = parse_feed(RSS, content_type=content_type)
        assert len(feed.entries) == 44
        assert feed.warning is None, content_type
        assert "Light Schrödinger Bridge" in [e.title for e in feed.entries]


def test_latin1_feed_is_decoded() -> None:
    doc = (
        "<?xml version='1.0' encoding='iso-8859-1'?><rss version='2.0'><channel><title>T</title>"
        "<item><title>Schrödinger</title></item></channel></rss>"
    ).encode("latin-1")
    assert parse_feed(doc).entries[0].title == "Schrödinger"


def test_entity_bombs_and_external_entities_are_not_expanded() -> None:
    lol = "".join(
        f'<!ENTITY l{i + 1} "{f"&l{i};" * 10}">' for i in range(9)
    )  # 10**9 characters if expanded
    doc = (
        f'<?xml version="1.0"?><!DOCTYPE rss [<!ENTITY l0 "lol">{lol}'
        '<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
        '<rss version="2.0"><channel><title>T</title>'
        "<item><title>&l9;</title><description>&xxe;</description></item></channel></rss>"
    ).encode()
    (entry,) = parse_feed(doc).entries
    assert len(entry.title) < 100
    assert "root:" not in entry.summary_text
