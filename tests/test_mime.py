"""The fast MIME assembler must produce what the standard library's route produces, as read by
the standard library's strict parser."""

from __future__ import annotations

import email
import email.policy
import html
import os
from email.message import EmailMessage

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from newsletter import mime

TEXT = "Light Schrödinger Bridge\n\n   matched: diffusion models\n" + "x" * 200 + "\n. \n"
HTML = "<p>Ünïcode ✓ = equals</p>\n<p>" + "long line " * 40 + "</p>\n"


def _fast(subject: str, text: str, html: str) -> bytes:
    headers = [
        mime.address_list_header("From", ["Paper Digest <digest@example.org>"]),
        mime.address_list_header("To", ["ada@example.org"]),
        mime.encode_header("Subject", subject),
        mime.encode_header("Date", "Sun, 22 Nov 2026 07:00:00 +0000"),
        mime.encode_header("Message-ID", "<digest.1@example.org>"),
        mime.address_list_header(
            "List-Unsubscribe",
            [
                "<https://digest.example.org/unsubscribe/" + "T" * 90 + ">",
                "<mailto:unsubscribe@example.org?subject=unsubscribe%20" + "T" * 90 + ">",
            ],
        ),
        mime.encode_header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]
    return mime.assemble(headers, [mime.qp(text)], [mime.qp(html)])


def _parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.strict)
    assert isinstance(msg, EmailMessage)
    return msg


def test_parses_like_the_standard_library_route() -> None:
    subject = "10 new papers for you · Sun 22 Nov 2026"
    raw = _fast(subject, TEXT, HTML)
    msg = _parse(raw)
    reference = EmailMessage()
    reference["Subject"] = subject
    reference.set_content(TEXT, charset="utf-8", cte="quoted-printable")
    reference.add_alternative(HTML, subtype="html", charset="utf-8", cte="quoted-printable")
    ref = _parse(reference.as_bytes(policy=email.policy.SMTP))

    assert msg["Subject"] == ref["Subject"] == subject
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    for ours, theirs in zip(msg.iter_parts(), ref.iter_parts(), strict=True):
        assert ours.get_content() == theirs.get_content()
        assert ours["Content-Transfer-Encoding"] == "quoted-printable"
        assert not ours.defects
    assert not msg.defects
    assert msg["List-Unsubscribe"].count("<") == 2
    assert msg["List-Unsubscribe"].startswith("<https://digest.example.org/unsubscribe/TTT")
    for line in raw.split(b"\r\n"):
        assert len(line) <= 998
    assert b"\n" not in raw.replace(b"\r\n", b""), "CRLF line ends only"


def test_non_ascii_subject_is_rfc2047_and_short_lines() -> None:
    raw = _fast("Schrödinger " * 12, "a\n", "<p>a</p>\n")
    header_block = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    subject = header_block[header_block.index("Subject:") : header_block.index("\r\nDate:")]
    assert "=?utf-8?" in subject
    assert all(len(line) <= 78 for line in subject.split("\r\n"))
    assert subject.count("\r\n ") >= 2, "folded onto continuation lines"
    assert _parse(raw)["Subject"] == "Schrödinger " * 12


@pytest.mark.parametrize("value", ["a\r\nBcc: x@evil.example", "a\nb", "a\0b"])
def test_header_injection_is_refused(value: str) -> None:
    with pytest.raises(mime.HeaderInjection):
        mime.encode_header("Subject", value)
    with pytest.raises(mime.HeaderInjection):
        mime.address_list_header("To", [value])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=300), min_size=1, max_size=5))
def test_fragments_concatenate(fragments: list[str]) -> None:
    """Encoding fragments separately equals encoding their concatenation: the property that
    lets a paper's fragment be encoded once and reused."""
    pieces = [f.replace("\r", "") + "\n" for f in fragments]
    assert b"".join(mime.qp(p) for p in pieces) == mime.qp("".join(pieces))
    raw = mime.assemble([mime.encode_header("Subject", "s")], [mime.qp(p) for p in pieces], [b""])
    text = _parse(raw).get_body(("plain",))
    assert text is not None
    assert text.get_content().replace("\r\n", "\n") == "".join(pieces)


_LINE_TEXT = st.lists(
    st.sampled_from([*'ab =.\t\r\nxé€<>"', "🙂", " \n", "\r\n", "=\n", "From ", "a" * 80]),
    max_size=120,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(st.lists(_LINE_TEXT, min_size=1, max_size=6), st.integers(min_value=1, max_value=8))
@example(["\raaé🙂aaé🙂aaaé🙂a€" + "a" * 80], 4)  # see the next test's first example
def test_line_cache_encodes_exactly_like_qp(texts: list[str], max_lines: int) -> None:
    """QPLines returns what `qp` does for any text (trailing spaces and tabs, long lines, a
    last line without a line break, stray CRs, non-ASCII), including texts that reuse cached
    lines, and whatever its size bound forces it to forget on the way."""
    cached = mime.QPLines(max_lines=max_lines)
    for text in texts + texts[::-1]:
        assert cached(text) == mime.qp(text), repr(text)


_HOLE_NAMES = st.sampled_from(["a", "b", "c"])


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(_LINE_TEXT, _HOLE_NAMES), max_size=6),
    _LINE_TEXT,
    st.fixed_dictionaries({"a": _LINE_TEXT, "b": _LINE_TEXT, "c": _LINE_TEXT}),
)
# Found by Hypothesis: a last line whose final soft-broken piece is exactly 76 characters.
@example([("\raaé🙂", "a"), ("a", "a")], "a€" + "a" * 80, {"a": "aaé🙂", "b": "", "c": ""})
@example([("x", "a")], "\n" + "a" * 76, {"a": "", "b": "", "c": ""})  # the same, simplest
def test_template_encodes_exactly_like_qp_of_the_filled_text(
    holes: list[tuple[str, str]], tail: str, values: dict[str, str]
) -> None:
    """QPTemplate encodes its hole-free lines ahead of time and the rest per call; the result
    is `qp` of the filled-in text whatever the holes hold (line breaks, stray CRs, long
    lines) and wherever they sit (start, middle or end of a line, on the last line)."""
    pieces = [piece for pair in holes for piece in pair] + [tail]
    template = mime.QPTemplate(pieces)
    lines = mime.QPLines(max_lines=4)
    for _ in range(2):  # the second time through, with lines remembered
        assert template.encode(values, lines) == mime.qp(mime.fill(pieces, values))


@settings(max_examples=400, deadline=None)
@given(st.one_of(_LINE_TEXT, _LINE_TEXT.map(lambda t: t + "\x00" + t)))
def test_7bit_html_reads_as_the_same_html(text: str) -> None:
    """Non-ASCII characters become numeric character references, which an HTML reader takes
    as the characters themselves: unescaped, the 7bit form is the original (line ends as
    CRLF, a NUL as U+FFFD, as HTML parsers read it anyway)."""
    encoded = mime.html_7bit(text)
    assert encoded.isascii()
    assert b"\n" not in encoded.replace(b"\r\n", b"") and b"\r" not in encoded.replace(b"\r\n", b"")
    assert b"\x00" not in encoded
    normal = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    assert html.unescape(encoded.decode("ascii")) == html.unescape(normal.replace("\x00", "\ufffd"))


def test_7bit_html_part_parses_and_keeps_every_character() -> None:
    pieces = [mime.html_7bit(HTML), mime.html_7bit("<p>Ω ≠ 🙂 &amp; &lt;b&gt;</p>\n")]
    assert all(mime.fits_7bit(p) for p in pieces)
    body, encoding = mime.html_part(pieces, fits=True)
    assert encoding == "7bit"
    raw = mime.assemble(
        [mime.encode_header("Subject", "s")], [mime.qp(TEXT)], body, html_encoding=encoding
    )
    assert raw.isascii()
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    msg = _parse(raw)
    assert not msg.defects
    part = msg.get_body(("html",))
    assert part is not None and not part.defects
    assert part["Content-Transfer-Encoding"] == "7bit"
    content = html.unescape(part.get_content()).replace("\r\n", "\n")
    assert content == html.unescape(HTML + "<p>Ω ≠ 🙂 &amp; &lt;b&gt;</p>\n")


def test_a_line_too_long_for_7bit_makes_the_part_quoted_printable() -> None:
    """7bit allows 998 octets a line. A piece with a longer line, or one that does not end
    its last line (it would run on into the next piece), is not 7bit material; the part is
    then quoted-printable, with the same HTML."""
    long_link = '<a href="https://example.org/' + "x" * 1200 + '">é</a>\n'
    long_piece = mime.html_7bit(long_link)
    assert not mime.fits_7bit(long_piece)
    assert not mime.fits_7bit(mime.html_7bit("<p>no line break at the end</p>"))
    assert mime.fits_7bit(mime.html_7bit("<p>the last piece may stop mid-line</p>"), last=True)
    pieces = [mime.html_7bit("<p>before</p>\n"), long_piece]
    body, encoding = mime.html_part(pieces, fits=all(mime.fits_7bit(p) for p in pieces))
    assert encoding == "quoted-printable"
    raw = mime.assemble(
        [mime.encode_header("Subject", "s")], [mime.qp(TEXT)], body, html_encoding=encoding
    )
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    part = _parse(raw).get_body(("html",))
    assert part is not None and part["Content-Transfer-Encoding"] == "quoted-printable"
    content = html.unescape(part.get_content()).replace("\r\n", "\n")
    assert content == html.unescape("<p>before</p>\n" + long_link)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=1600), min_size=1, max_size=8),
    st.booleans(),
)
def test_fits_7bit_is_the_line_length_rule(lengths: list[int], last: bool) -> None:
    """fits_7bit's block-wise shortcut answers what the rule says: every line at most 998
    octets and, unless it is the last piece, a line break at the end."""
    data = b"\r\n".join(b"x" * n for n in lengths)
    rule = all(n <= 998 for n in lengths) and (last or data.endswith(b"\r\n"))
    assert mime.fits_7bit(data, last=last) == rule


def test_boundaries_are_random_distinct_and_not_shared_with_a_forked_sender() -> None:
    """Boundaries are random per message, and a forked sender does not hand out its parent's
    (drawing them from the OS in batches was tried: a batch left at fork time would be shared
    unless the child dropped it)."""
    first = [mime.new_boundary() for _ in range(600)]
    assert len(set(first)) == len(first)
    assert all(len(b) == 26 and b.startswith("=_") and int(b[2:], 16) >= 0 for b in first)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next boundaries and leave at once
        os.write(write, " ".join(mime.new_boundary() for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {mime.new_boundary() for _ in range(5)}
    assert len(child) == 5
    assert not child & parent
