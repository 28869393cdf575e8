"""The development SMTP sink: accepts every message and keeps it in a Maildir.

Like Mailpit or MailHog, it lets the whole pipeline send real mail over real SMTP on a
developer's machine or in tests without anything leaving it, and lets people look at what
would have been sent. The store is a plain Maildir so mutt, `mailbox.Maildir` or any mail
client can open it too.

Each stored file is the message exactly as the client sent it (after SMTP dot-unstuffing),
preceded by one line that the sink adds, ``X-Sink-Envelope: {json}``, holding the envelope
sender, the envelope recipients and the arrival time. The envelope lives inside the file
(rather than in a sidecar) so that storing a message stays a single atomic rename and
mail clients show it as an ordinary header; it is JSON so that any address, however odd,
round-trips on one line.
"""

from __future__ import annotations

import email.policy
import itertools
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from aiosmtpd.controller import Controller

__all__ = [
    "DATA_SIZE_LIMIT",
    "BackgroundSMTPServer",
    "Sink",
    "SinkMessage",
    "clear",
    "count_messages",
    "envelope_sender",
    "format_line",
    "list_messages",
    "run_forever",
]

log = logging.getLogger(__name__)

DATA_SIZE_LIMIT = 50 * 1024 * 1024
"""Largest message accepted; well above any digest, so the sink never hides a size bug."""

READY_TIMEOUT = 60.0
"""How long start() waits for the server thread; loaded CI machines can be very slow."""

_LISTEN_BACKLOG = 512
"""Load tests may open many connections at once; a short accept queue would turn some away."""

_ENVELOPE_PREFIX = b"X-Sink-Envelope: "
_SEQUENCE = itertools.count()
"""Process-wide, so that two sinks writing to one Maildir never pick the same file name."""

_PARSER = BytesParser(_class=EmailMessage, policy=email.policy.default)


@dataclass(frozen=True, slots=True)
class SinkMessage:
    key: str  # Maildir key
    received_at: datetime  # UTC
    mail_from: str  # envelope sender
    rcpt_tos: tuple[str, ...]  # envelope recipients
    subject: str  # decoded
    message: EmailMessage  # parsed with email.policy.default
    raw: bytes  # exactly what the client sent, after dot-unstuffing


class _Controller(Controller):
    """aiosmtpd's Controller, serving on a socket that is already bound.

    Controller binds inside its own thread and then connects to ``self.port`` to check the
    server is up, which fails for port 0. Binding first, in the caller's thread, gives the
    real port before anything starts, reports bind errors directly, and is race-free.
    """

    def __init__(self, handler: object, sock: socket.socket, **kwargs: Any) -> None:
        host, port = sock.getsockname()[:2]
        # Controller connects to this address once to check the server answers; not every
        # OS lets a client connect to a wildcard address.
        if host in ("0.0.0.0", "::"):
            host = "::1" if sock.family == socket.AF_INET6 else "127.0.0.1"
        super().__init__(handler, hostname=host, port=port, **kwargs)
        self._sock = sock

    def _create_server(self) -> Any:
        return self.loop.create_server(
            self._factory_invoker,
            sock=self._sock,
            backlog=_LISTEN_BACKLOG,
            ssl=self.ssl_context,
        )


def _listen(host: str, port: int) -> socket.socket:
    # Built by hand rather than with socket.create_server(), which leaves proto at 0:
    # asyncio only sets TCP_NODELAY on sockets whose proto is IPPROTO_TCP, and without it
    # aiosmtpd's one-write-per-line EHLO reply meets Nagle plus delayed ACKs, costing
    # about 40 ms on every connection.
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None,
        port,
        type=socket.SOCK_STREAM,
        proto=socket.IPPROTO_TCP,
        flags=socket.AI_PASSIVE,
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("", "::"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(_LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Pipelining:
    """A handler that also advertises PIPELINING (RFC 2920), as every mainstream MTA does.

    aiosmtpd already serves pipelined commands correctly (it reads one command at a time
    from a buffered stream and answers in order); it just does not say so in its EHLO reply,
    so clients would never use it. Everything else goes to the wrapped handler."""

    def __init__(self, handler: object) -> None:
        self._handler = handler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handler, name)

    def __dir__(self) -> list[str]:  # aiosmtpd finds a handler's hooks with dir()
        return sorted({*super().__dir__(), *dir(self._handler)})

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does itself when no hook is set
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


class BackgroundSMTPServer:
    """An aiosmtpd server with its own event loop in a background thread.

    The common base of Sink and testsmtp.FaultySMTPServer, so both bind, start and stop
    the same way. Restarting after stop() binds the same port again, so clients configured
    with it keep working across a simulated outage. `pipelining=False` makes a server that
    does not advertise PIPELINING, for testing clients against one.
    """

    def __init__(self, handler: object, host: str, port: int, *, pipelining: bool = True) -> None:
        self._handler = _Pipelining(handler) if pipelining else handler
        self._host = host
        self._port = port
        # Fixed once here: without it aiosmtpd calls socket.getfqdn() on every connection,
        # which can block for seconds where DNS is slow.
        self._server_hostname = socket.gethostname() or "localhost"
        self._controller: _Controller | None = None
        self._state_lock = threading.Lock()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The real port once started (port 0 asks the OS for a free one)."""
        return self._port

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> None:
        with self._state_lock:
            if self._controller is not None:
                raise RuntimeError(f"SMTP server already running on {self._host}:{self._port}")
            sock = _listen(self._host, self._port)
            controller = _Controller(
                self._handler,
                sock,
                ready_timeout=READY_TIMEOUT,
                server_hostname=self._server_hostname,
                data_size_limit=DATA_SIZE_LIMIT,
                enable_SMTPUTF8=True,
            )
            try:
                controller.start()
            except BaseException:
                with suppress(Exception):
                    controller.stop(no_assert=True)
                sock.close()
                raise
            self._port = controller.port
            self._controller = controller

    def stop(self) -> None:
        """Stop serving; open connections are cut. Does nothing if not running."""
        with self._state_lock:
            controller, self._controller = self._controller, None
            if controller is not None:
                controller.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def envelope_sender(envelope: Any) -> str:
    """The envelope sender of an aiosmtpd Envelope, "" for the null sender (bounces).

    aiosmtpd reports ``MAIL FROM:<>`` as the string "<>".
    """
    mail_from: str = envelope.mail_from or ""
    return "" if mail_from == "<>" else mail_from


class _MaildirWriter:
    """Delivers into a Maildir the standard way: write in tmp/, then rename into new/.

    Not mailbox.Maildir.add(), because that fsyncs every message: durability a
    development sink does not need, and a cost that dominates a 100k-message load test.
    The rename still guarantees readers never see a half-written message.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        host = socket.gethostname() or "localhost"
        # The escapes the Maildir spec (and mailbox.Maildir) use for these two characters.
        self._host = host.replace("/", r"\057").replace(":", r"\072")

    def ensure(self) -> None:
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)

    def add(
        self, mail_from: str, rcpt_tos: tuple[str, ...], received_at: datetime, raw: bytes
    ) -> str:
        key = (
            f"{int(received_at.timestamp())}.M{received_at.microsecond:06d}"
            f"P{os.getpid()}Q{next(_SEQUENCE)}.{self._host}"
        )
        envelope = {
            "mail_from": mail_from,
            "rcpt_tos": list(rcpt_tos),
            "received_at": received_at.isoformat(),
        }
        prefix = _ENVELOPE_PREFIX + json.dumps(envelope, ensure_ascii=True).encode() + b"\r\n"
        tmp = self.path / "tmp" / key
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(prefix)
                f.write(raw)
            os.rename(tmp, self.path / "new" / key)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return key


class _SinkHandler:
    def __init__(
        self, writer: _MaildirWriter, on_message: Callable[[SinkMessage], None] | None
    ) -> None:
        self._writer = writer
        self._on_message = on_message
        self.received = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content
        mail_from = envelope_sender(envelope)
        rcpt_tos: tuple[str, ...] = tuple(envelope.rcpt_tos)
        received_at = datetime.now(UTC)
        try:
            key = self._writer.add(mail_from, rcpt_tos, received_at, raw)
        except OSError:
            # A full or read-only disk is transient from the client's point of view: a 4xx
            # makes it retry later instead of believing the message was delivered.
            log.exception("SMTP sink could not store a message in %s", self._writer.path)
            return "451 4.3.0 Could not store the message, try again later"
        self.received += 1
        if self._on_message is not None:
            message = _make_message(key, received_at, mail_from, rcpt_tos, raw)
            try:
                self._on_message(message)
            except Exception:
                # The message is already stored; a failing callback must not make the
                # client send it again.
                log.exception("SMTP sink on_message callback failed for %s", key)
        return f"250 2.0.0 OK: queued as {key}"


class Sink(BackgroundSMTPServer):
    """Runs aiosmtpd in a background thread; usable as a context manager.

    on_message runs in the server's thread for every stored message; keep it quick, since
    no other connection is served while it runs.
    """

    def __init__(
        self,
        maildir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 1025,
        *,
        on_message: Callable[[SinkMessage], None] | None = None,
    ) -> None:
        self._writer = _MaildirWriter(Path(maildir))
        self._sink_handler = _SinkHandler(self._writer, on_message)
        super().__init__(self._sink_handler, host, port)

    @property
    def maildir(self) -> Path:
        return self._writer.path

    @property
    def received_count(self) -> int:
        """Messages stored by this sink, without touching the disk (for load tests)."""
        return self._sink_handler.received

    def start(self) -> None:
        self._writer.ensure()
        super().start()

    def messages(self) -> list[SinkMessage]:
        """Everything in the maildir, oldest first, including mail from earlier runs."""
        return list_messages(self._writer.path)


def _make_message(
    key: str, received_at: datetime, mail_from: str, rcpt_tos: tuple[str, ...], raw: bytes
) -> SinkMessage:
    message = _PARSER.parsebytes(raw)
    assert isinstance(message, EmailMessage)
    try:
        subject = str(message.get("subject", ""))
    except Exception:
        # policy.default parses headers lazily and can choke on badly broken ones; the
        # listing should still show the message.
        subject = ""
    return SinkMessage(
        key=key,
        received_at=received_at,
        mail_from=mail_from,
        rcpt_tos=rcpt_tos,
        subject=subject,
        message=message,
        raw=raw,
    )


def _message_files(maildir: Path) -> Iterator[os.DirEntry[str]]:
    for sub in ("new", "cur"):
        try:
            entries = list(os.scandir(maildir / sub))
        except FileNotFoundError:
            continue
        for entry in entries:
            if not entry.name.startswith(".") and entry.is_file():
                yield entry


def _read_stored(entry: os.DirEntry[str]) -> SinkMessage | None:
    try:
        with open(entry.path, "rb") as f:
            data = f.read()
        mtime = entry.stat().st_mtime
    except FileNotFoundError:
        return None  # deleted, or moved new/ -> cur/ by a mail client, while we listed
    key = entry.name.split(":", 1)[0]
    if data.startswith(_ENVELOPE_PREFIX):
        end = data.find(b"\r\n")
        try:
            envelope = json.loads(data[len(_ENVELOPE_PREFIX) : end])
            return _make_message(
                key,
                datetime.fromisoformat(envelope["received_at"]).astimezone(UTC),
                str(envelope["mail_from"]),
                tuple(str(r) for r in envelope["rcpt_tos"]),
                data[end + 2 :],
            )
        except (ValueError, KeyError, TypeError):
            pass
    # Put there by something other than the sink: show it, with what little we know.
    return _make_message(key, datetime.fromtimestamp(mtime, UTC), "", (), data)


def list_messages(maildir: str | os.PathLike[str]) -> list[SinkMessage]:
    """Every message in the maildir, oldest first; read-only, no sink needs to be running."""
    found = [m for e in _message_files(Path(maildir)) if (m := _read_stored(e)) is not None]
    found.sort(key=lambda m: (m.received_at, m.key))
    return found


def count_messages(maildir: str | os.PathLike[str]) -> int:
    """How many messages are stored, without reading them (for large load tests)."""
    return sum(1 for _ in _message_files(Path(maildir)))


def clear(maildir: str | os.PathLike[str]) -> int:
    """Delete every stored message and return how many there were."""
    removed = 0
    for entry in _message_files(Path(maildir)):
        with suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed += 1
    return removed


def _human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


_MAX_SHOWN_RECIPIENTS = 3


def format_line(msg: SinkMessage) -> str:
    """One line per message: time (UTC), envelope from -> to, subject, size."""
    when = msg.received_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    sender = msg.mail_from or "<>"
    shown = ", ".join(msg.rcpt_tos[:_MAX_SHOWN_RECIPIENTS]) or "(no recipients)"
    if len(msg.rcpt_tos) > _MAX_SHOWN_RECIPIENTS:
        shown += f" +{len(msg.rcpt_tos) - _MAX_SHOWN_RECIPIENTS} more"
    subject = " ".join(msg.subject.split()) or "(no subject)"
    return f'{when}Z  {sender} -> {shown}  "{subject}"  {_human_size(len(msg.raw))}'


def _print_flushed(line: str) -> None:
    # Flushed so lines show up at once when stdout is a pipe or a journal, not a terminal.
    print(line, flush=True)


def run_forever(
    maildir: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 1025,
    *,
    echo: Callable[[str], None] = _print_flushed,
) -> None:
    """Serve until SIGINT or SIGTERM, echoing one line per message. Main thread only."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before the server starts, so a signal during start-up still stops cleanly.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sink = Sink(maildir, host, port, on_message=lambda m: echo(format_line(m)))
        with sink:
            echo(
                f"SMTP sink listening on {host}:{sink.port}, "
                f"keeping messages in the Maildir {sink.maildir.resolve()}"
            )
            # A timed wait, because an untimed one is not woken by signals on every platform.
            while not stop.wait(0.5):
                pass
        echo(f"SMTP sink stopped after receiving {sink.received_count} message(s)")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
