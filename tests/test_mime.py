"""The fast MIME assembler must produce what the standard library's route produces, as read by
the standard library's strict parser."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
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
def test_line_cache_encodes_exactly_like_qp(texts: list[str], max_lines: int) -> None:
    """QPLines returns what `qp` does for any text (trailing spaces and tabs, long lines, a
    last line without a line break, stray CRs, non-ASCII), including texts that reuse cached
    lines, and whatever its size bound forces it to forget on the way."""
    cached = mime.QPLines(max_lines=max_lines)
    for text in texts + texts[::-1]:
        assert cached(text) == mime.qp(text), repr(text)
