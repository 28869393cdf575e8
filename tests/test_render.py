from __future__ import annotations

import dataclasses
import email
import email.policy
import json
import re
import textwrap
from datetime import UTC, date, datetime
from email.message import EmailMessage
from pathlib import Path

import markupsafe
import pytest
from conftest import html_source
from hypothesis import example, given
from hypothesis import strategies as st

from newsletter import mime, render
from newsletter.config import Settings
from newsletter.render import (
    BUILTIN_TEMPLATES,
    Digest,
    Renderer,
    ShownPaper,
    make_item,
    shorten,
    stored_hits,
)

NOW = datetime(2026, 11, 22, 7, 0, tzinfo=UTC)


def _digest(title: str, summary: str = "We study diffusion models for inverse problems.") -> Digest:
    item = make_item(
        ShownPaper.of(
            title=title,
            link="https://papers.example.org/x",
            summary=summary,
            published=datetime(2024, 1, 2, tzinfo=UTC),
            authors=["4 authors"],
            source="Daily Papers",
        ),
        stored_hits([{"keyword": "diffusion models", "title": False, "summary": True}]),
    )
    return Digest(
        to="ada@example.org",
        period="2026-11-22",
        day=date(2026, 11, 22),
        items=[item],
        manage_url="https://digest.example.org/manage/TOKEN",
        unsubscribe_url="https://digest.example.org/unsubscribe/TOKEN",
        unsubscribe_mailto="mailto:unsubscribe@example.org?subject=unsubscribe%20TOKEN",
        message_id="<digest.2026-11-22.1.abc@example.org>",
    )


def _settings(**kw: object) -> Settings:
    return Settings(from_addr="Paper Digest <digest@example.org>", **kw)  # type: ignore[arg-type]


def test_message_structure_and_headers() -> None:
    renderer = Renderer(_settings())
    raw = renderer.render_bytes(_digest("Light Schrödinger Bridge"), now=NOW)
    msg = email.message_from_bytes(raw, policy=email.policy.strict)
    assert not msg.defects
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg["Subject"] == "1 new paper for you · Sun 22 Nov 2026"
    assert msg["From"] == "Paper Digest <digest@example.org>"
    assert msg["Message-ID"] == "<digest.2026-11-22.1.abc@example.org>"
    assert msg["List-Unsubscribe"] == (
        "<https://digest.example.org/unsubscribe/TOKEN>, "
        "<mailto:unsubscribe@example.org?subject=unsubscribe%20TOKEN>"
    )
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Date"] == "Sun, 22 Nov 2026 07:00:00 +0000"
    for part in msg.iter_parts():
        assert part.get_content_charset() == "utf-8"
    text = msg.get_body(("plain",))
    assert text is not None and text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Light Schrödinger Bridge" in text.get_content()
    assert msg.get_body(("html",))["Content-Transfer-Encoding"] == "7bit"
    assert b"Light Schr&#246;dinger Bridge" in raw, "the HTML part is ASCII: ö as &#246;"
    html = html_source(msg)
    assert "Light Schrödinger Bridge" in html
    assert "<mark" in html and ">diffusion models</mark>" in html, "matched words highlighted"
    assert "matched: <strong>diffusion models</strong> in summary" in html
    assert "https://digest.example.org/manage/TOKEN" in html
    assert "<img" not in html and "http://" not in html.replace("http://www.w3.org", "")


def test_hostile_title_is_escaped() -> None:
    renderer = Renderer(_settings())
    text, html = renderer.bodies(_digest('<script>alert(1)</script><img src=x onerror="y">'))
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;" in html
    assert "<script>alert(1)</script>" in text, "the text part shows the title as text"


def test_operator_templates_override_one_file(tmp_path: Path) -> None:
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "digest_subject.txt").write_text(
        "Lab digest\r\nBcc: evil@example.org ({{ count }})", encoding="utf-8"
    )
    renderer = Renderer(_settings(templates_dir=str(tmp_path)))
    digest = _digest("A title")
    assert renderer.subject(digest) == "Lab digest Bcc: evil@example.org (1)", (
        "line breaks from a template never reach a header"
    )
    assert "A title" in renderer.bodies(digest)[1], "other templates are the built-in ones"


def test_operator_templates_keep_jinja_globals_and_imports(tmp_path: Path) -> None:
    """Templates' globals are one flat dict here (`_FlatGlobalsEnvironment`, for speed): an
    operator's template still has Jinja's own (range, namespace) and imports macros."""
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "digest_subject.txt").write_text(
        '{% from "email/_marked.html" import marked %}{% set n = namespace(k=0) %}'
        "{% for i in range(count) %}{% set n.k = n.k + 1 %}{% endfor %}"
        '{{ n.k }} × {{ marked([("x<", True)]) | striptags }}',
        encoding="utf-8",
    )
    renderer = Renderer(_settings(templates_dir=str(tmp_path)))
    assert renderer.subject(_digest("A title")) == "1 × x<"


def test_shorten_cuts_long_summaries() -> None:
    short, cut = shorten("word " * 50)
    assert not cut and short == " ".join(["word"] * 50)
    text = "First sentence is here. " * 40
    short, cut = shorten(text, 200)
    assert cut and len(short) <= 200 and short.endswith(".")
    short, cut = shorten("x" * 10 + " " + "y" * 500, 100)
    assert cut and short.endswith("…")


# --- fill-in rendering ------------------------------------------------------------------------

FIXTURE_PAPERS = json.loads(
    (Path(__file__).parent / "data" / "daily-papers.json").read_text(encoding="utf-8")
)
HOSTILE = [
    "<script>alert(1)</script> & \"quotes\" 'apostrophes'",
    "Schrödinger {{ digest.to }} {% raw %} \x02abc:title\x03",
    "A & B < C > D",
]
KEYWORD_SETS = [["diffusion models"], ["LLM", "reasoning"], ["graph neural network"], ["A"]]


def _digests(count: int) -> list[Digest]:
    """Real papers and hostile strings, several keyword mixes, 1 to 6 items each, readers
    whose addresses need escaping."""
    papers = [(p["title"], p["abstract"]) for p in FIXTURE_PAPERS] + [(h, h) for h in HOSTILE]
    digests = []
    for n in range(count):
        items = []
        for k in range(1 + n % 6):
            title, summary = papers[(n * 7 + k * 3) % len(papers)]
            keywords = KEYWORD_SETS[(n + k) % len(KEYWORD_SETS)]
            items.append(
                make_item(
                    ShownPaper.of(
                        title=title,
                        link=None if k == 2 else f"https://papers.example.org/{n}/{k}?a=1&b=2",
                        summary=summary,
                        published=None if k == 1 else datetime(2024, 1, 2, tzinfo=UTC),
                        authors=["O'Brien & Co"],
                        source="Daily <Papers>",
                    ),
                    stored_hits(
                        [{"keyword": kw, "title": True, "summary": k % 2 == 0} for kw in keywords]
                    ),
                )
            )
        to = f"o'brien&{n}@example.org" if n % 3 == 0 else f"reader{n}@example.org"
        digests.append(
            Digest(
                to=to,
                period="2026-11-22",
                day=date(2026, 11, 22 - n % 2),
                items=items,
                manage_url=f"https://digest.example.org/manage/T{n}.x-y_z",
                unsubscribe_url=f"https://digest.example.org/unsubscribe/U{n}",
                unsubscribe_mailto=f"mailto:unsubscribe@example.org?subject=unsubscribe%20U{n}",
                message_id=f"<digest.2026-11-22.{n}.abc@example.org>",
            )
        )
    return digests


def _same_bytes(raw: bytes) -> bytes:
    """The MIME boundary is random per message; everything else must match byte for byte."""
    return re.sub(rb"=_[0-9a-f]{24}", b"=_BOUNDARY", raw)


def test_fill_in_rendering_is_byte_identical_to_full_rendering() -> None:
    fast, full = Renderer(_settings()), Renderer(_settings())
    full.fill_in = False
    assert fast.fill_in, "the shipped templates only print the reader's fields"
    for digest in _digests(120):
        assert _same_bytes(fast.render_bytes(digest, now=NOW)) == _same_bytes(
            full.render_bytes(digest, now=NOW)
        ), digest.to
    assert fast.fill_in, "no fill-in differed from its full render"
    assert fast._item_skeletons and fast._frame_skeletons, "the fill-in path was taken"
    html = email.message_from_bytes(
        fast.render_bytes(_digests(1)[0], now=NOW), policy=email.policy.default
    ).get_body(("html",))
    assert html is not None
    content = html.get_content()
    assert "o&#39;brien&amp;0@example.org" in content, "the reader's address is escaped"
    assert "<script>" not in content


def test_templates_that_branch_on_the_reader_are_rendered_in_full(tmp_path: Path) -> None:
    """Placeholders cannot stand in for a value a template tests: such templates are
    detected before anything is sent and every email is rendered in full."""
    (tmp_path / "email").mkdir()
    builtin = (BUILTIN_TEMPLATES / "email" / "digest.txt").read_text(encoding="utf-8")
    (tmp_path / "email" / "digest.txt").write_text(
        '{% if digest.to.startswith("reader1") %}Hello, reader one!\n{% endif %}' + builtin,
        encoding="utf-8",
    )
    renderer = Renderer(_settings(templates_dir=str(tmp_path)))
    assert not renderer.fill_in
    bodies = {d.to: renderer.render_bytes(d, now=NOW) for d in _digests(3)}
    assert b"Hello, reader one!" in bodies["reader1@example.org"]
    assert b"Hello, reader one!" not in bodies["reader2@example.org"]


def test_a_template_that_breaks_fill_in_at_run_time_falls_back(tmp_path: Path) -> None:
    """The static check cannot see everything (here: a custom filter of the operator's
    choice on the title parts); the first fill-in of each paper is compared with a full
    render, and one difference turns fill-in off for good, with the right email sent."""
    (tmp_path / "email").mkdir()
    builtin = (BUILTIN_TEMPLATES / "email" / "digest_item.txt").read_text(encoding="utf-8")
    (tmp_path / "email" / "digest_item.txt").write_text(
        builtin + "{{ item.title_parts | length }} parts\n", encoding="utf-8"
    )
    renderer = Renderer(_settings(templates_dir=str(tmp_path)))
    assert not renderer.fill_in, "item.title_parts used outside marked(): detected up front"
    renderer.fill_in = True  # pretend the static check missed it
    full = Renderer(_settings(templates_dir=str(tmp_path)))
    for digest in _digests(5):
        assert _same_bytes(renderer.render_bytes(digest, now=NOW)) == _same_bytes(
            full.render_bytes(digest, now=NOW)
        )
    assert not renderer.fill_in


@given(st.text())
def test_fill_in_escaping_matches_markupsafe(text: str) -> None:
    assert render._escape(text) == str(markupsafe.escape(text))


def test_summary_lines_are_shared_between_readers_of_a_paper() -> None:
    """The HTML summary is broken into short lines at the same places whatever a reader's
    keywords, so every line without that reader's highlights is the same text (and so the
    same encoded bytes) in every digest carrying the paper; the words shown do not change."""
    summary = (
        "Diffusion models have emerged as the state of the art for generative modelling of "
        "images, audio and molecules. We study their behaviour on inverse problems with noisy "
        "measurements and propose a sampler that is both faster and more accurate than "
        "previous approaches, with an averylongunbrokentokenthatisnotawordbutmustnotbesplit"
        "anywhere at all in the middle."
    )

    def parts(keywords: list[str]) -> list[tuple[str, bool]]:
        item = make_item(
            ShownPaper.of(
                title="A paper",
                link=None,
                summary=summary,
                published=None,
                authors=[],
                source="",
            ),
            stored_hits([{"keyword": k, "title": False, "summary": True} for k in keywords]),
        )
        return list(item.summary_parts)

    one, other = parts(["diffusion models"]), parts(["inverse problems", "sampler"])
    for got in (one, other):
        text = "".join(t for t, _ in got)
        shown, _ = shorten(summary)
        assert text.replace("\n", " ") == shown
        assert all(len(line) <= 64 or " " not in line for line in text.split("\n"))
    assert [t for t, hit in one if hit] == ["Diffusion models"]
    assert [t for t, hit in other if hit] == ["inverse problems", "sampler"]

    def plain_lines(got: list[tuple[str, bool]]) -> set[str]:
        html = "".join(f"<mark>{t}</mark>" if hit else t for t, hit in got)
        return {line for line in html.split("\n") if "<mark>" not in line}

    lines_one, lines_other = plain_lines(one), plain_lines(other)
    assert len(lines_one & lines_other) >= 3, (lines_one, lines_other)
    assert "".join(t for t, _ in one).split("\n") == "".join(t for t, _ in other).split("\n")


_WORDS = st.sampled_from(
    ["a", "bb", "dddd", "é—", "x" * 80, "a-b-c-d", "https://e.org/" + "y" * 70]
)


@given(
    st.lists(st.tuples(_WORDS, st.sampled_from([" ", "  ", "\n", " \t"])), max_size=40),
    st.sampled_from([1, 3, 10, 20, 72]),
    st.sampled_from(["", "  "]),
    st.sampled_from([None, "", "  ", "    "]),
)
def test_wrap_is_textwrap_without_breaking_words(
    words: list[tuple[str, str]], width: int, indent: str, subsequent: str | None
) -> None:
    """The text part's word wrap (a regex per line width) does what textwrap does on the
    same words when told to keep long words and hyphenated ones whole."""
    text = "".join(word + gap for word, gap in words)
    expected = textwrap.fill(
        " ".join(text.split()),
        width,
        initial_indent=indent,
        subsequent_indent=indent if subsequent is None else subsequent,
        break_long_words=False,
        break_on_hyphens=False,
    )
    assert render._wrap(text, width, indent, subsequent) == expected


def test_a_link_too_long_for_7bit_sends_that_digest_quoted_printable() -> None:
    """HTML goes out 7bit (ASCII, lines of at most 998 octets). A feed's 1,200-character
    link makes a longer line; that digest's HTML part is then quoted-printable, with the
    same HTML, and the next digest is 7bit again."""
    renderer = Renderer(_settings())
    long_link = "https://papers.example.org/" + "x" * 1200
    digest = _digest("Ünïcode title")
    first = digest.items[0]
    item = dataclasses.replace(first, paper=dataclasses.replace(first.paper, link=long_link))
    raw = renderer.render_bytes(dataclasses.replace(digest, items=[item]), now=NOW)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    msg = email.message_from_bytes(raw, policy=email.policy.strict)
    assert isinstance(msg, EmailMessage) and not msg.defects
    assert msg.get_body(("html",))["Content-Transfer-Encoding"] == "quoted-printable"
    html = html_source(msg)
    assert f'href="{long_link}"' in html and "Ünïcode title" in html
    raw = renderer.render_bytes(digest, now=NOW)
    again = email.message_from_bytes(raw, policy=email.policy.strict)
    assert isinstance(again, EmailMessage)
    assert again.get_body(("html",))["Content-Transfer-Encoding"] == "7bit"


def test_every_line_of_a_rendered_message_ends_in_crlf() -> None:
    """The mailer takes `render_bytes` output as CRLF-only without looking (crlf_only), so
    no input may leave a bare CR or LF: hostile titles, summaries with CRs and tabs, the
    7bit and the quoted-printable HTML routes."""
    renderer = Renderer(_settings())
    digests = _digests(40)
    stray = _digest("Title with a\rbare CR", "Summary\r\nwith CRLF\rand CR\nand LF\tand tab.")
    first = stray.items[0]
    long_link = dataclasses.replace(
        first, paper=dataclasses.replace(first.paper, link="https://e.org/" + "x" * 1200)
    )
    digests += [stray, dataclasses.replace(stray, items=[long_link])]
    raws = [renderer.render_bytes(d, now=NOW) for d in digests]
    for raw in raws:
        assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r"), raw[:200]
        assert raw.endswith(b"\r\n")


_ITEM_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",)) | st.sampled_from("<>&'\"\r\n\x00 é—"),
    max_size=120,
)


@given(
    title=_ITEM_TEXT,
    summary=_ITEM_TEXT.map(lambda s: s + " diffusion models and graphs " + s),
    hits=st.lists(
        st.tuples(
            st.sampled_from(["diffusion models", "graph", "é", "A & B", "LLM"]),
            st.sampled_from([True, False, None]),
            st.sampled_from([True, False, None]),
        ),
        max_size=4,
        unique_by=lambda h: h[0],
    ),
)
def test_items_are_encoded_as_their_filled_templates(
    title: str, summary: str, hits: list[tuple[str, bool | None, bool | None]]
) -> None:
    """Sending encodes an item straight from its hits (`_ItemSkeleton.encode`); that must be
    byte for byte what filling in the templates and encoding the result gives, whatever the
    paper holds (markup, CRs, NULs, non-ASCII) and however the keywords matched."""
    renderer = Renderer(_settings())
    paper = ShownPaper.of(
        title=title or "t",
        link="https://papers.example.org/1?a=1&b=2",
        summary=summary,
        published=datetime(2024, 1, 2, tzinfo=UTC),
        authors=["O'Brien & Co"],
        source="Daily <Papers>",
    )
    item = make_item(paper, tuple(hits))
    skeleton = renderer._item_skeleton_for(item)
    assert skeleton is not None
    text, html = skeleton.fill(item)
    assert skeleton.encode(item, renderer._qp) == (mime.qp(text), mime.html_7bit(html))
    assert (text, html) == (renderer._item_text_str(item), renderer._item_html_str(item))


@pytest.fixture(scope="module")
def holes_ending_lines(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Frame templates where the reader's address ends a line: a CR at the end of a value then
    meets the template's LF, which must read as the filled text reads (one line break)."""
    folder = tmp_path_factory.mktemp("templates")
    (folder / "email").mkdir()
    for name in ("digest.html", "digest.txt"):
        builtin = (BUILTIN_TEMPLATES / "email" / name).read_text(encoding="utf-8")
        changed = builtin.replace("{{ digest.to }}", "{{ digest.to }}\n")
        assert changed != builtin
        (folder / "email" / name).write_text(changed, encoding="utf-8")
    return str(folder)


@pytest.mark.parametrize("shipped", [True, False], ids=["shipped", "holes-ending-lines"])
@given(title=_ITEM_TEXT, to=_ITEM_TEXT, link=_ITEM_TEXT)
@example(title="t", to="ada@example.org\r", link="l")
def test_frames_are_encoded_as_their_filled_templates(
    holes_ending_lines: str, shipped: bool, title: str, to: str, link: str
) -> None:
    """Sending encodes a digest's frame from its skeleton (`_FrameSkeleton.encode`, the text's
    hole-free lines encoded ahead); that must be byte for byte what filling in the frame
    templates and encoding the result gives, whatever the values hold (a first title with a
    CR or markup, which goes into the preheader; an address or a link with anything in it)."""
    renderer = Renderer(_settings() if shipped else _settings(templates_dir=holes_ending_lines))
    digest = dataclasses.replace(
        _digest(title or "t"), to=to, manage_url=link, unsubscribe_url=link + "/u"
    )
    skeleton = renderer._frame_skeleton_for(digest)
    assert skeleton is not None
    (text_head, text_foot), (html_head, html_foot) = skeleton.fill(digest)
    assert skeleton.encode(digest, renderer._qp) == (
        mime.qp(text_head),
        mime.qp(text_foot),
        mime.html_7bit(html_head),
        mime.html_7bit(html_foot),
    )
    assert skeleton.fill(digest) == renderer._full_frames(digest)
