"""Fast, standards-correct MIME assembly for multipart/alternative messages.

The standard library's `EmailMessage` route re-parses and re-folds every header and re-encodes
every body on each message (about 700 messages/s here, most of it in header folding). A digest
run sends the same few hundred papers to many people, so this module works on pre-encoded
pieces instead:

- bodies are quoted-printable, encoded by ``binascii.b2a_qp`` (C). QP works line by line, so a
  body made of fragments that each end in CRLF encodes to the concatenation of the fragments'
  encodings: a paper's fragment is encoded once and reused in every digest that carries it;
- headers are written directly, RFC 2047-encoding only values that are not ASCII, and folding
  at the separators the caller gives (structured headers keep their tokens whole).

The output is checked against the standard library's parser in tests/test_mime.py.
"""

from __future__ import annotations

import binascii
import secrets
from collections.abc import Iterable, Sequence
from email.header import Header

CRLF = "\r\n"
_MAX_LINE = 78


class HeaderInjection(ValueError):
    """A header name or value contains a line break or a control character."""


def _check(name: str, value: str) -> None:
    if any(c in value for c in "\r\n\0") or not name.isascii() or ":" in name:
        raise HeaderInjection(f"refusing header {name!r}: line break or control character")


def encode_header(name: str, value: str) -> str:
    """One header line (with its CRLF), RFC 2047-encoded when the value is not ASCII.

    Unstructured text (Subject) is folded at spaces; values that are not ASCII become UTF-8
    encoded-words, which `Header` splits so no line passes 78 characters."""
    _check(name, value)
    if value.isascii():
        return fold(name, value.split(" "), " ") + CRLF
    encoded = Header(value, "utf-8", header_name=name).encode(linesep=CRLF)
    return f"{name}: {encoded}{CRLF}"


def fold(name: str, parts: Sequence[str], separator: str) -> str:
    """Join `parts` with `separator`, starting a continuation line (CRLF + space) where the
    line would pass 78 characters. Parts themselves are never split: a URL stays whole (RFC
    5322 allows lines up to 998 characters)."""
    line = f"{name}: "
    out: list[str] = []
    for i, part in enumerate(parts):
        piece = part if i == 0 else separator + part
        if i and len(line) + len(piece) > _MAX_LINE:
            out.append(line.rstrip() if separator == " " else line + separator.rstrip())
            line = " " + part
        else:
            line += piece
    out.append(line)
    return CRLF.join(out)


def address_list_header(name: str, addresses: Iterable[str]) -> str:
    """For already-formatted addresses (``Name <a@b>`` or ``<https://…>``), folded after commas."""
    items = list(addresses)
    for item in items:
        _check(name, item)
    return fold(name, items, ", ") + CRLF


def qp(text: str) -> bytes:
    """Quoted-printable body text with CRLF line ends. `text` should end in a line break if it
    is to be concatenated with other encoded fragments."""
    data = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", CRLF).encode("utf-8")
    encoded = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    # b2a_qp keeps a lone "." line as it is; SMTP dot-stuffing is the transport's job.
    return encoded


class QPLines:
    """`qp`, remembering each line's encoding. Quoted-printable encodes every line on its own,
    so a text's encoding is the concatenation of its lines' encodings; a digest run sends the
    same template lines, paper metadata and (wrapped) summary lines to many readers, and only
    the lines that carry a reader's highlights are new. Bounded: cleared when full."""

    def __init__(self, max_lines: int = 20_000) -> None:
        self._lines: dict[str, bytes] = {}
        self._max = max_lines

    def __call__(self, text: str) -> bytes:
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        last = lines.pop()
        cache = self._lines
        get = cache.get
        encoded = [get(line) for line in lines]
        if None in encoded:
            for i, found in enumerate(encoded):
                if found is None:
                    line = lines[i]
                    found = binascii.b2a_qp(
                        (line + CRLF).encode("utf-8"), quotetabs=False, istext=True, header=False
                    )
                    if len(cache) >= self._max:
                        cache.clear()
                    encoded[i] = cache[line] = found
        if last:
            # b2a_qp breaks long lines the way the text's first line ends (CRLF here, as
            # in `qp` of the whole text), so the unterminated last line is encoded with one
            # and it is taken off again.
            encoded.append(qp(last + CRLF)[:-2] if lines else qp(last))
        return b"".join(encoded)  # type: ignore[arg-type]  # no None is left


def new_boundary() -> str:
    # Cannot occur in QP output: "=" is always encoded there, and the boundary contains "=_".
    return f"=_{secrets.token_hex(12)}"


def assemble(
    header_lines: Sequence[str],
    text_qp: Sequence[bytes],
    html_qp: Sequence[bytes],
    *,
    boundary: str | None = None,
) -> bytes:
    """A complete multipart/alternative message: the text part first and the HTML part last
    (clients show the last part they can), both UTF-8 quoted-printable."""
    b = boundary or new_boundary()
    head = "".join(header_lines) + (
        f'MIME-Version: 1.0{CRLF}Content-Type: multipart/alternative; boundary="{b}"{CRLF}{CRLF}'
    )
    part = (
        'Content-Type: text/{kind}; charset="utf-8"' + CRLF + "Content-Transfer-Encoding: "
        "quoted-printable" + CRLF + CRLF
    )
    chunks: list[bytes] = [
        # ASCII but for a non-ASCII address, which RFC 6532 allows raw (sent with SMTPUTF8).
        head.encode("utf-8"),
        f"--{b}{CRLF}{part.format(kind='plain')}".encode("ascii"),
        *text_qp,
        # The CRLF before a boundary belongs to the boundary (RFC 2046), so each part gets
        # one more: the body's own last line break survives.
        f"{CRLF}--{b}{CRLF}{part.format(kind='html')}".encode("ascii"),
        *html_qp,
        f"{CRLF}--{b}--{CRLF}".encode("ascii"),
    ]
    return b"".join(chunks)
