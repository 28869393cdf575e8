"""Many SMTP connections driven by one thread, for `newsletter send`.

A thread per connection, each waiting for its server's replies, cost several hand-overs of
Python's interpreter lock per message: each reply a thread waited for woke it, and the thread
it woke had to take the lock from whichever was rendering. At a thousand messages a second
those hand-overs cost about as much as rendering the messages. Here one thread drives every
connection through non-blocking sockets (`selectors`): it writes a message's commands and text
and handles replies as they arrive, so it works without waiting while any connection has
something to do.

A `Lane` is one connection. It speaks the protocol of `mailer.Connection`: MAIL, RCPT and DATA
in one write where the server offers PIPELINING (RFC 2920; one at a time where it does not),
then the message, whose final dot is held back until the caller allows it (the ledger rule of
`sending.Sender`) and then goes out together with the next message's commands. Opening a
connection (TCP, EHLO, STARTTLS, login) blocks, so `Connector` does it in a thread of its own.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import smtplib
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from newsletter.config import Settings
from newsletter.mailer import (
    ACCEPTED,
    Outcome,
    Result,
    ServerUnreachable,
    classify,
    envelope_commands,
    first_refusal,
    needs_utf8,
    open_smtp,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
_MAX_REPLY = 64 * 1024  # a reply longer than this is not SMTP
_ENVELOPE = ("mail", "rcpt", "data")
# A non-blocking socket (plain or TLS) with nothing to read, or no room to write, for now.
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


@dataclass(frozen=True, slots=True)
class Message(Generic[T]):
    token: T  # the caller's, handed back with the result
    sender: str
    recipient: str
    data: bytes  # as DATA carries it (`mailer.stuffed`), without the final dot


class Lane(Generic[T]):
    """One SMTP connection, driven by the caller's event loop. `report(message, result)`
    hears how each message ended; result None means it never reached the server in full (the
    connection went before its final dot, or before its commands): send it again, it was not
    attempted.

    The caller: `attach`es an open connection; `begin`s a message when the lane is `idle`;
    when a message is `held` (all but its final dot sent) and the lane is not `busy`,
    `finish`es it, passing the next message to go with the dot; feeds `on_readable`,
    `on_writable` and `check_timeout`; and `quit`s."""

    def __init__(
        self,
        settings: Settings,
        report: Callable[[Message[T], Result | None], None],
        detach: Callable[[socket.socket], None] = lambda sock: None,
    ) -> None:
        """`detach(sock)` is called before the lane closes its socket (to unregister it
        from a selector while the descriptor is still its own)."""
        self.settings = settings
        self._report = report
        self._detach = detach
        self._smtp: smtplib.SMTP | None = None
        self._pipelining = False
        self._utf8 = False
        self._out = bytearray()
        self._in = bytearray()
        self._expect: deque[tuple[str, Message[T] | None]] = deque()
        self._later: deque[tuple[str, bytes]] = deque()  # commands waiting for a reply first
        self._replies: list[tuple[str, int, bytes]] = []  # of the envelope in flight
        self.held: Message[T] | None = None
        self.sent = 0  # messages finished on this connection
        self.deadline: float | None = None

    # -- state --------------------------------------------------------------------------
    @property
    def open(self) -> bool:
        return self._smtp is not None

    @property
    def busy(self) -> bool:
        """Waiting for replies (or for its output to drain)."""
        return bool(self._expect) or bool(self._out)

    @property
    def idle(self) -> bool:
        return self._smtp is not None and not self._expect and self.held is None

    @property
    def worn(self) -> bool:
        """Has carried its share of messages: to be closed once idle and opened anew."""
        return self.sent >= self.settings.smtp_messages_per_connection

    @property
    def sock(self) -> socket.socket:
        assert self._smtp is not None and self._smtp.sock is not None
        return self._smtp.sock

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def attach(self, smtp: smtplib.SMTP) -> None:
        assert smtp.sock is not None
        smtp.sock.setblocking(False)
        self._smtp = smtp
        self._pipelining = smtp.has_extn("pipelining")
        self._utf8 = smtp.has_extn("smtputf8")
        self.sent = 0

    # -- sending ------------------------------------------------------------------------
    def begin(self, message: Message[T]) -> None:
        assert self.idle, "begin() on a lane that is not idle"
        self._envelope(message, b"")

    def finish(self, following: Message[T] | None = None) -> bool:
        """Send the held message's final dot, and `following`'s commands with it where the
        server pipelines and this connection is not worn out. Returns whether `following`
        was taken (if not, `begin` it once the lane is idle, or on another lane)."""
        held = self.held
        assert held is not None and not self.busy, "finish() without a held message"
        self.held = None
        self._expect.append(("dot", held))
        take = (
            following is not None
            and self._pipelining
            and not self.sent + 1 >= self.settings.smtp_messages_per_connection
        )
        if take:
            assert following is not None
            self._envelope(following, b".\r\n")
        else:
            self._write(b".\r\n")
        return take

    def _envelope(self, message: Message[T], prefix: bytes) -> None:
        utf8 = self._utf8 and needs_utf8(message.sender, message.recipient)
        commands = envelope_commands(message.sender, message.recipient, utf8)
        for stage in _ENVELOPE:
            self._expect.append((stage, message))
        if self._pipelining:
            self._write(prefix + b"".join(commands))
            return
        self._write(prefix + commands[0])
        self._later.extend(zip(_ENVELOPE[1:], commands[1:], strict=True))

    def quit(self) -> None:
        """Close the connection: with QUIT when nothing is in progress; a held message
        (never dotted) is dropped by the server and reported as not sent."""
        if self._smtp is None:
            return
        if not self.busy and self.held is None:
            with contextlib.suppress(OSError, ssl.SSLError):
                self.sock.send(b"QUIT\r\n")
        self._close("closed", not_sent=True)

    # -- events -------------------------------------------------------------------------
    def on_writable(self) -> None:
        self._flush()

    def on_readable(self) -> None:
        smtp = self._smtp
        if smtp is None or smtp.sock is None:
            return
        sock = smtp.sock
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    self._broken("connection dropped: the server hung up")
                    return
                self._in += chunk
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                    break
        except _WOULD_BLOCK:
            pass
        except (OSError, ssl.SSLError) as exc:
            self._broken(f"connection dropped: {type(exc).__name__}: {exc}")
            return
        self._touch()
        while self._smtp is not None:
            reply = self._take_reply()
            if reply is None:
                break
            self._handle(*reply)
        if self._smtp is not None and len(self._in) > _MAX_REPLY:
            self._broken("the server sent a reply too long to be SMTP")

    def check_timeout(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline and self.busy:
            timeout = self.settings.smtp_timeout
            self._broken(f"no answer within {timeout:g}s", timed_out=True)

    # -- internals ----------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        self._out += data
        self._touch()
        self._flush()

    def _flush(self) -> None:
        smtp = self._smtp
        if smtp is None or smtp.sock is None or not self._out:
            return
        try:
            while self._out:
                sent = smtp.sock.send(self._out)
                del self._out[:sent]
        except _WOULD_BLOCK:
            pass
        except (OSError, ssl.SSLError) as exc:
            self._broken(f"connection dropped: {type(exc).__name__}: {exc}")
            return
        self._touch()

    def _touch(self) -> None:
        self.deadline = time.monotonic() + self.settings.smtp_timeout

    def _take_reply(self) -> tuple[int, bytes] | None:
        """One whole reply (all its lines) from the input, or None if it has not all come."""
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._in.find(b"\n", start)
            if end < 0:
                return None
            line = bytes(self._in[start:end]).rstrip(b"\r")
            start = end + 1
            lines.append(line[4:].strip(b" \t"))
            if len(line) < 4 or line[3:4] != b"-":
                break
        del self._in[:start]
        try:
            code = int(line[:3])
        except ValueError:
            code = -1  # as smtplib: not a reply at all
        return code, b"\n".join(lines)

    def _handle(self, code: int, text: bytes) -> None:
        kind, message = self._expect.popleft()
        if kind == "dot":
            assert message is not None
            self.sent += 1
            self._report(message, classify(code, text, "data"))
            if code == 421:  # closing: whatever was pipelined after the dot is not begun
                self._close("closed by the server", not_sent=True)
            return
        if kind in _ENVELOPE:
            assert message is not None
            self._envelope_reply(kind, code, text, message)
            return
        if kind == "rset" and code != 250:
            self._close("RSET refused", not_sent=True)
        # "discard": the reply to an empty message ending a DATA that should not have been
        # accepted; nothing to do.

    def _envelope_reply(self, stage: str, code: int, text: bytes, message: Message[T]) -> None:
        self._replies.append((stage, code, text))
        if code == 421:  # the server is closing: nothing more will come
            self._replies = []
            self._later.clear()
            self._report(message, classify(code, text, stage))
            self._close("closed by the server", not_sent=True, skip=message)
            return
        if not self._pipelining and code not in ACCEPTED[stage]:
            self._refused(stage, code, text, message, data_open=False)
            return
        if stage != "data":
            if self._later:  # one at a time: the next command now that this one is taken
                self._out += self._later.popleft()[1]
                self._flush()
            return
        replies, self._replies = self._replies, []
        refused = first_refusal(replies)
        if refused is None:
            self.held = message
            self._write(message.data)
            return
        self._refused(*refused, message, data_open=code == 354)

    def _refused(
        self, stage: str, code: int, text: bytes, message: Message[T], *, data_open: bool
    ) -> None:
        # Drop the rest of this envelope's expectations (one-at-a-time servers: not sent).
        while self._expect and self._expect[0][1] is message:
            self._expect.popleft()
        self._replies = []
        self._later.clear()
        self._report(message, classify(code, text, stage))
        if data_open:
            # DATA was taken although MAIL or RCPT was not (a server that answers DATA
            # before looking back): end it with an empty message, which it must reject.
            self._expect.append(("discard", None))
            self._write(b".\r\n")
        self._expect.append(("rset", None))
        self._write(b"RSET\r\n")

    def _broken(self, reason: str, *, timed_out: bool = False) -> None:
        """The connection failed: every message in progress gets its result, the way
        `mailer.Connection` reports them (a message whose dot was sent may have been
        accepted: temporary failure, retried; commands that only followed it: not begun)."""
        self._close(reason, not_sent=False)

    def _close(self, reason: str, *, not_sent: bool, skip: Message[T] | None = None) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            if smtp.sock is not None:
                self._detach(smtp.sock)
            smtp.close()
        self._out.clear()
        self._in.clear()
        self._later.clear()
        self._replies = []
        self.deadline = None
        expected, self._expect = list(self._expect), deque()
        after_dot = False
        reported: set[int] = set()
        if skip is not None:
            reported.add(id(skip))
        for kind, message in expected:
            if message is None or id(message) in reported:
                continue
            reported.add(id(message))
            if kind == "dot":
                after_dot = True
                self._report(message, Result(Outcome.TEMPORARY, None, reason, "data"))
            elif not_sent or after_dot:
                self._report(message, None)
            else:
                self._report(message, Result(Outcome.TEMPORARY, None, reason, kind))
        if self.held is not None:
            held, self.held = self.held, None
            self._report(held, None)  # never dotted: the server drops it


class Connector:
    """Opens SMTP connections (TCP, EHLO, STARTTLS, login) in a thread of its own, so that
    a slow handshake holds up no other connection. `wake` is called when one is ready."""

    def __init__(self, settings: Settings, wake: Callable[[], None]) -> None:
        self.settings = settings
        self._wake = wake
        self._requests: queue.Queue[int | None] = queue.Queue()
        self._ready: list[tuple[int, smtplib.SMTP | ServerUnreachable]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="smtp-connector", daemon=True)
        self._thread.start()

    def request(self, lane: int) -> None:
        self._requests.put(lane)

    def ready(self) -> list[tuple[int, smtplib.SMTP | ServerUnreachable]]:
        with self._lock:
            ready, self._ready = self._ready, []
        return ready

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()
        for _, opened in self.ready():
            if isinstance(opened, smtplib.SMTP):
                opened.close()

    def _run(self) -> None:
        while (lane := self._requests.get()) is not None:
            opened: smtplib.SMTP | ServerUnreachable
            try:
                opened = open_smtp(self.settings)
            except ServerUnreachable as exc:
                opened = exc
            with self._lock:
                self._ready.append((lane, opened))
            self._wake()
