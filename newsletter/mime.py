"""Fast, standards-correct MIME assembly for multipart/alternative messages.

The standard library's `EmailMessage` route re-parses and re-folds every header and re-encodes
every body on each message: 184-238 of our 25 KB digests a second on one core here, most of it
header folding and quoted-printable encoding in Python (`benchmarks/bench_render.py` times it
beside this module). A digest run sends the same few hundred papers to many people, so this
module works on pre-encoded pieces instead:

- the text body is quoted-printable, encoded by ``binascii.b2a_qp`` (C). QP works line by
  line, so a body made of fragments that each end in CRLF encodes to the concatenation of the
  fragments' encodings: a paper's fragment is encoded once and reused in every digest that
  carries it, and a template's hole-free lines once for all (`QPTemplate`);
- the HTML body is 7bit: ASCII, with character references for the rest (`html_7bit`), so it
  needs no encoding at all; quoted-printable only when a line would pass 998 octets;
- headers are written directly, RFC 2047-encoding only values that are not ASCII, and folding
  at the separators the caller gives (structured headers keep their tokens whole).

The output is checked against the standard library's parser in tests/test_mime.py.
"""

from __future__ import annotations

import binascii
import secrets
from collections.abc import Iterable, Mapping, Sequence
from email.header import Header

CRLF = "\r\n"
_MAX_LINE = 78


class HeaderInjection(ValueError):
    """A header name or value contains a line break or a control character."""


def _check(name: str, value: str) -> None:
    if "\r" in value or "\n" in value or "\0" in value or not name.isascii() or ":" in name:
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


def _last_line(text: str, *, after_break: bool) -> bytes:
    """`text`, the end of a longer text (after one of its line breaks, if `after_break`),
    encoded as `qp` of the whole would encode it. b2a_qp breaks long lines the way the data's
    first line ends, so the text is encoded after a CRLF, which is then taken off. (A CRLF
    after it instead, taken off again, moved a soft line break: b2a_qp lets the data's very
    last line run one character longer than a line that has a line break after it.
    Hypothesis found it.) `qp` reads any CR in `text` as the whole text would."""
    return qp(CRLF + text)[2:] if after_break else qp(text)


class QPLines:
    """`qp`, remembering each line's encoding. Quoted-printable encodes every line on its own,
    so a text's encoding is the concatenation of its lines' encodings; a digest run sends the
    same template lines, paper metadata and (wrapped) summary lines to many readers, and only
    the lines that carry a reader's highlights are new. Most of those are never seen again (a
    reader's address, a rare keyword combination: two thirds of the distinct lines of a run),
    so a line is kept only when it comes round a second time; what a first sighting leaves is
    its hash. Bounded: cleared when full."""

    def __init__(self, max_lines: int = 20_000) -> None:
        self._lines: dict[str, bytes] = {}
        self._seen: set[int] = set()
        self._max = max_lines

    def line(self, text: str) -> bytes:
        """`self(text)` for what is usually one line with its line break (a template's line
        with a reader's values in it), without splitting it into lines first."""
        encoded = self._lines.get(text)
        if encoded is not None:
            return encoded
        if not text.endswith("\n") or text.find("\n") != len(text) - 1 or "\r" in text:
            return self(text)
        return self._keep(text[:-1], text)

    def _keep(self, line: str, key: str) -> bytes:
        """A line's encoding; kept (under `key`) when the line is seen a second time."""
        found = binascii.b2a_qp(
            (line + CRLF).encode("utf-8"), quotetabs=False, istext=True, header=False
        )
        seen = hash(key)
        if seen not in self._seen:
            if len(self._seen) >= 4 * self._max:
                self._seen.clear()
            self._seen.add(seen)
        else:
            if len(self._lines) >= self._max:
                self._lines.clear()
            self._lines[key] = found
        return found

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
                    encoded[i] = self._keep(lines[i], lines[i])
        if last:
            encoded.append(_last_line(last, after_break=bool(lines)))
        return b"".join(encoded)  # type: ignore[arg-type]  # no None is left


class QPTemplate:
    """A text with named holes whose hole-free lines are quoted-printable encoded once.

    `pieces` alternate literal text (even indexes) and hole names (odd), as `re.split` with one
    group gives them. An email's item or frame template has a few lines that carry the reader's
    values and many that do not; `encode` fills and encodes only the former, and its output is
    exactly `qp` of the filled text (property-tested), so fragments still concatenate."""

    def __init__(self, pieces: Sequence[str]) -> None:
        # Segments: encoded bytes for runs of hole-free lines, or a line's pieces (same
        # even/odd layout) to fill and encode per call.
        self._segments: list[bytes | list[str]] = []
        if any("\r" in piece for piece in pieces[::2]):
            # Jinja never leaves a CR in a template's text; should one be there, it could pair
            # with a LF at the start of a hole's value, so nothing is encoded ahead.
            self._segments.append(list(pieces))
            self._tail: list[str] | None = None
            self._has_lines = False
            return
        static: list[str] = []  # hole-free lines ahead, each with its line break
        line = [""]  # the line being read: its text, then each hole's name and the text after
        for i, piece in enumerate(pieces):
            if i % 2:
                line += [piece, ""]
            elif len(line) == 1:  # no hole on this line yet: the lines this piece ends have none
                ended, newline, line[0] = (line[0] + piece).rpartition("\n")
                if newline:
                    static.append(ended + newline)
            else:  # the line's holes end at its line break; the lines after it have none yet
                rest, newline, after = piece.partition("\n")
                line[-1] += rest + newline
                if newline:
                    self._add_static(static)
                    self._segments.append(line)
                    ended, newline, tail = after.rpartition("\n")
                    if newline:
                        static.append(ended + newline)
                    line = [tail]
        self._add_static(static)
        # A last line without a line break is filled and encoded in context on each call
        # (its soft line breaks follow the first line's ending, see QPLines).
        self._tail = line if line != [""] else None
        self._has_lines = bool(self._segments)

    def _add_static(self, lines: list[str]) -> None:
        if lines:
            self._segments.append(qp("".join(lines)))
            lines.clear()

    def encode(self, values: Mapping[str, str], lines: QPLines) -> bytes:
        out: list[bytes] = []
        for segment in self._segments:
            if isinstance(segment, bytes):
                out.append(segment)
            else:
                out.append(lines.line(fill(segment, values)))
        if self._tail is not None:
            out.append(_last_line(fill(self._tail, values), after_break=self._has_lines))
        return b"".join(out)


def fill(pieces: list[str], values: Mapping[str, str]) -> str:
    """Pieces as `QPTemplate` takes them, with each hole replaced by its value."""
    out = pieces.copy()
    for i in range(1, len(out), 2):
        out[i] = values[out[i]]
    return "".join(out)


SEVEN_BIT_LINE = 998  # RFC 5322 / RFC 2045: octets per line, not counting the CRLF
_HALF_LINE = (SEVEN_BIT_LINE + 1) // 2


def html_7bit(text: str) -> bytes:
    """HTML for a 7bit part: CRLF line ends and every character outside ASCII written as a
    numeric character reference (``é`` as ``&#233;``), which HTML reads as the character
    itself. Nothing is left to encode: this is a third of the cost of quoted-printable per
    digest item, and the part is smaller (no ``=3D`` in every attribute). The caller checks
    line lengths (`fits_7bit`) and falls back to quoted-printable when a line is too long."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:  # the one ASCII octet 7bit data may not carry (nor may HTML)
        text = text.replace("\x00", "\ufffd")
    return text.replace("\n", CRLF).encode("ascii", "xmlcharrefreplace")


def fits_7bit(data: bytes, *, last: bool = False) -> bool:
    """Whether `data` (from `html_7bit`) can go into a 7bit part as one of its pieces: no line
    over 998 octets and, unless it is the last piece, ending in a line break, so that no line
    runs on into the next piece."""
    if not last and not data.endswith(b"\r\n"):
        return False
    if len(data) <= SEVEN_BIT_LINE:
        return True
    # Cheap and sufficient: when every block of 499 octets holds a line break, no line can
    # reach 999 (it would contain a whole block). Only when one does not, look line by line.
    find = data.find
    for start in range(0, len(data), _HALF_LINE):
        if find(b"\n", start, start + _HALF_LINE) < 0:
            return max(map(len, data.split(b"\r\n"))) <= SEVEN_BIT_LINE
    return True


def new_boundary() -> str:
    # Cannot occur in QP output: "=" is always encoded there, and the boundary contains "=_".
    # The 7bit HTML part could hold it in principle; 96 random bits from `secrets` per message
    # leave nothing a feed could aim at. (Drawing them 256 at a time saved 0.45 µs a message,
    # 0.2% of rendering one: measured twice and left out; see benchmarks/ROUNDS.md.)
    return f"=_{secrets.token_hex(12)}"


def html_part(pieces: Sequence[bytes], fits: bool) -> tuple[Sequence[bytes], str]:
    """The HTML part's body and transfer encoding: the `html_7bit` pieces as they are when
    they `fits_7bit`, else (a line over 998 octets: a very long link) quoted-printable."""
    if fits:
        return pieces, "7bit"
    return [qp(b"".join(pieces).decode("ascii"))], "quoted-printable"


def _part(kind: str, encoding: str) -> bytes:
    """A body part's headers and the blank line after them."""
    return (
        f'Content-Type: text/{kind}; charset="utf-8"{CRLF}'
        f"Content-Transfer-Encoding: {encoding}{CRLF}{CRLF}"
    ).encode("ascii")


_TEXT_PART = _part("plain", "quoted-printable")
_HTML_PART = {encoding: _part("html", encoding) for encoding in ("7bit", "quoted-printable")}


def assemble(
    header_lines: Sequence[str],
    text_qp: Sequence[bytes],
    html: Sequence[bytes],
    *,
    html_encoding: str = "quoted-printable",
    boundary: str | None = None,
) -> bytes:
    """A complete multipart/alternative message: the text part first and the HTML part last
    (clients show the last part they can), UTF-8, the text quoted-printable and the HTML as
    `html_encoding` says (see `html_part`)."""
    b = boundary or new_boundary()
    head = "".join(header_lines) + (
        f'MIME-Version: 1.0{CRLF}Content-Type: multipart/alternative; boundary="{b}"{CRLF}{CRLF}'
    )
    # The CRLF before a boundary belongs to the boundary (RFC 2046), so each part gets one
    # more: the body's own last line break survives.
    delimiter = f"{CRLF}--{b}{CRLF}".encode("ascii")
    html_headers = _HTML_PART.get(html_encoding) or _part("html", html_encoding)
    chunks: list[bytes] = [
        # ASCII but for a non-ASCII address, which RFC 6532 allows raw (sent with SMTPUTF8).
        head.encode("utf-8"),
        delimiter[2:],  # the first boundary follows the headers' blank line
        _TEXT_PART,
        *text_qp,
        delimiter,
        html_headers,
        *html,
        f"{CRLF}--{b}--{CRLF}".encode("ascii"),
    ]
    return b"".join(chunks)
