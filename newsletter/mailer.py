"""SMTP delivery of one message at a time over a reused connection, with every outcome
classified: sent (250, reply kept), temporary (4xx, timeouts, dropped connections: retry later)
or permanent (5xx: never retry).

smtplib's high-level ``sendmail`` hides the server's final reply; the ledger keeps it, so this
speaks MAIL/RCPT/DATA itself through smtplib's public per-command methods.
"""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import ssl
from dataclasses import dataclass
from enum import StrEnum

from newsletter.config import Settings

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    SENT = "sent"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    code: int | None
    reply: str
    stage: str = "data"  # mail, rcpt or data: only a refused rcpt says the address is bad

    def describe(self) -> str:
        return f"{self.code} {self.reply}" if self.code else self.reply


class ServerUnreachable(Exception):
    """The server could not be reached at all; nothing was handed over."""


def _text(reply: bytes | str) -> str:
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return " ".join(reply.split())[:500]


def classify(code: int, reply: bytes | str, stage: str = "data") -> Result:
    if 200 <= code < 300:
        return Result(Outcome.SENT, code, _text(reply), stage)
    if 400 <= code < 500:
        return Result(Outcome.TEMPORARY, code, _text(reply), stage)
    return Result(Outcome.PERMANENT, code, _text(reply), stage)


def open_smtp(settings: Settings) -> smtplib.SMTP:
    """A connection ready for MAIL: connected, EHLO, STARTTLS and login as configured.
    Raises ServerUnreachable, saying why, when that cannot be done."""
    s = settings
    try:
        smtp: smtplib.SMTP
        if s.smtp_tls == "tls":
            smtp = smtplib.SMTP_SSL(
                s.smtp_host,
                s.smtp_port,
                timeout=s.smtp_timeout,
                context=ssl.create_default_context(),
            )
        else:
            smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout)
        if smtp.sock is not None:
            # The final dot goes out as a small write of its own (see `begin`): without
            # NODELAY, Nagle's algorithm holds it until the server's delayed ACK (40 ms).
            smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        smtp.ehlo_or_helo_if_needed()
        if s.smtp_tls == "starttls":
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
        if s.smtp_user:
            smtp.login(s.smtp_user, s.smtp_password)
    except smtplib.SMTPAuthenticationError as exc:
        raise ServerUnreachable(
            f"SMTP login as {s.smtp_user!r} refused ({exc.smtp_code}); check "
            "NEWSLETTER_SMTP_USER and NEWSLETTER_SMTP_PASSWORD"
        ) from None
    except (OSError, smtplib.SMTPException) as exc:
        reason = str(exc) or type(exc).__name__
        raise ServerUnreachable(
            f"cannot reach the SMTP server {s.smtp_host}:{s.smtp_port}: {reason}"
        ) from None
    return smtp


class Connection:
    """One SMTP session, reopened when it breaks or after `messages_per_connection`
    messages (servers throttle long sessions; reconnecting keeps that predictable)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._smtp: smtplib.SMTP | None = None
        self._sent_on_connection = 0
        self._in_data = False  # between begin() and end()

    def _open(self) -> smtplib.SMTP:
        smtp = open_smtp(self.settings)
        self._sent_on_connection = 0
        return smtp

    def close(self) -> None:
        if self._in_data:  # a QUIT now would be message text: hang up, the server drops it
            self._in_data = False
            self._drop()
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (OSError, smtplib.SMTPException):
                self._smtp.close()
            self._smtp = None

    def _drop(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None

    def send(self, sender: str, recipient: str, message: bytes) -> Result:
        """Raises ServerUnreachable only when no connection could be made; every other
        failure is a Result, so the caller records it against this one delivery."""
        refused = self.begin(sender, recipient, message)
        return refused if refused is not None else self.end()

    def begin(self, sender: str, recipient: str, message: bytes) -> Result | None:
        """Everything but the final dot: MAIL, RCPT, DATA and the message itself. The server
        takes responsibility for a message only when it answers the dot, so a sender can do
        all this while the previous message's outcome is still being written to the ledger,
        and send the dot (`end`) once it is: overlap without a second message at risk.
        Returns the server's refusal, or None when the dot is all that is left to send."""
        if (
            self._smtp is None
            or self._sent_on_connection >= self.settings.smtp_messages_per_connection
        ):
            self.close()
            self._smtp = self._open()
        smtp = self._smtp
        stage = "mail"
        options = []
        if needs_utf8(recipient, sender) and smtp.has_extn("smtputf8"):
            options = ["SMTPUTF8", "BODY=8BITMIME"]
        data = stuffed(message)
        if smtp.has_extn("pipelining"):
            return self._begin_pipelined(smtp, sender, recipient, options, data)
        try:
            code, reply = smtp.mail(sender, options)
            if code not in ACCEPTED[stage]:
                self._reset()
                return classify(code, reply, stage)
            stage = "rcpt"
            code, reply = smtp.rcpt(recipient)
            if code not in ACCEPTED[stage]:
                self._reset()
                return classify(code, reply, stage)
            stage = "data"
            code, reply = smtp.docmd("data")
            if code not in ACCEPTED[stage]:
                if code == 421:
                    self._drop()
                else:
                    self._reset()
                return classify(code, reply, stage)
            smtp.send(data)
        except (OSError, smtplib.SMTPException) as exc:
            return self._failure(exc, stage)
        self._in_data = True
        return None

    def _begin_pipelined(
        self,
        smtp: smtplib.SMTP,
        sender: str,
        recipient: str,
        options: list[str],
        data: bytes,
    ) -> Result | None:
        """`begin` in one round trip instead of three (RFC 2920): MAIL, RCPT and DATA go out
        in one write and their replies are read in order. On a real network each saved
        round trip is tens of milliseconds per message per connection."""
        try:
            smtp.send(b"".join(envelope_commands(sender, recipient, bool(options))))
        except (OSError, smtplib.SMTPException) as exc:
            return self._failure(exc, "mail")
        return self._envelope_replies(smtp, data)

    def _envelope_replies(self, smtp: smtplib.SMTP, data: bytes) -> Result | None:
        """Read the replies to a pipelined MAIL, RCPT and DATA; send the message when all
        three were accepted. Returns the refusal, or None when only the dot is left."""
        replies: list[tuple[str, int, bytes]] = []
        stage = "mail"
        try:
            for stage in _PIPELINED_STAGES:
                code, reply = smtp.getreply()
                if code == 421:  # the server is closing: nothing more will come
                    self._drop()
                    return classify(code, reply, stage)
                replies.append((stage, code, reply))
            refused = first_refusal(replies)
            if refused is None:
                smtp.send(data)
                self._in_data = True
                return None
            if replies[-1][1] == 354:
                # DATA was taken although MAIL or RCPT was not (a server that answers DATA
                # before looking back): end it with an empty message, which it must reject.
                smtp.send(b".\r\n")
                smtp.getreply()
        except (OSError, smtplib.SMTPException) as exc:
            # A refusal read before the hang-up says more than the hang-up itself.
            refused = first_refusal(replies)
            if refused is None:
                return self._failure(exc, stage)
            self._drop()
            return classify(refused[1], refused[2], refused[0])
        self._reset()
        return classify(refused[1], refused[2], refused[0])

    def end(self) -> Result:
        """The final dot of the message `begin` sent, and the server's verdict on it."""
        smtp = self._smtp
        if smtp is None or not self._in_data:
            raise RuntimeError("end() without a successful begin()")
        self._in_data = False
        try:
            smtp.send(b".\r\n")
            code, reply = smtp.getreply()
        except (OSError, smtplib.SMTPException) as exc:
            return self._failure(exc, "data")
        self._sent_on_connection += 1
        if code == 421:
            self._drop()
        elif code != 250:
            self._reset()
        return classify(code, reply, "data")

    def _failure(self, exc: BaseException, stage: str) -> Result:
        if isinstance(exc, smtplib.SMTPServerDisconnected):
            self._drop()
            return Result(
                Outcome.TEMPORARY, None, f"connection dropped: {exc or 'no reply'}", stage
            )
        if isinstance(exc, smtplib.SMTPResponseException):
            # 421 closes the session.
            if exc.smtp_code == 421:
                self._drop()
            else:
                self._reset()
            return classify(exc.smtp_code, exc.smtp_error, stage)
        self._drop()
        if isinstance(exc, TimeoutError):
            return Result(
                Outcome.TEMPORARY,
                None,
                f"no answer within {self.settings.smtp_timeout:g}s",
                stage,
            )
        return Result(Outcome.TEMPORARY, None, f"{type(exc).__name__}: {exc}", stage)

    def _reset(self) -> None:
        if self._smtp is None:
            return
        try:
            self._smtp.rset()
        except (OSError, smtplib.SMTPException):
            self._drop()


def probe(settings: Settings) -> None:
    """Connect, TLS and log in exactly as sending does, send nothing; raises ServerUnreachable
    with the reason. For health checks."""
    conn = Connection(settings)
    conn._smtp = conn._open()
    conn.close()


def send_one(settings: Settings, sender: str, recipient: str, message: bytes) -> Result:
    """A single message on its own connection: for notices (confirmation, manage link) that
    are sent while a person waits, outside the digest ledger."""
    conn = Connection(settings)
    try:
        return conn.send(sender, recipient, message)
    except ServerUnreachable as exc:
        return Result(Outcome.TEMPORARY, None, str(exc), "connect")
    finally:
        conn.close()


_PIPELINED_STAGES = ("mail", "rcpt", "data")


def envelope_commands(sender: str, recipient: str, utf8: bool) -> list[bytes]:
    """MAIL, RCPT and DATA for one message; `utf8`: the addresses need SMTPUTF8 (RFC 6531),
    which the caller has checked the server offers."""
    extra = " SMTPUTF8 BODY=8BITMIME" if utf8 else ""
    encoding = "utf-8" if utf8 else "ascii"
    return [
        f"MAIL FROM:{_path(sender)}{extra}\r\n".encode(encoding),
        f"RCPT TO:{_path(recipient)}\r\n".encode(encoding),
        b"DATA\r\n",
    ]


ACCEPTED = {"mail": (250,), "rcpt": (250, 251), "data": (354,)}


def first_refusal(replies: list[tuple[str, int, bytes]]) -> tuple[str, int, bytes] | None:
    return next((r for r in replies if r[1] not in ACCEPTED[r[0]]), None)


def stuffed(message: bytes, *, crlf_only: bool = False) -> bytes:
    """The message as DATA carries it: CRLF line ends, a dot doubled at the start of a line
    (RFC 5321 4.5.2), ending in CRLF. What smtplib.data() does, without its two regular
    expressions over every message when the line ends are already right (they are, here)."""
    if not crlf_only:
        lines = message.count(b"\n")
        if lines != message.count(b"\r\n") or message.count(b"\r") != lines:
            message = re.sub(rb"(?:\r\n|\n|\r(?!\n))", b"\r\n", message)
    if message.startswith(b"."):
        message = b"." + message
    # A regular expression does this in a third of the time `bytes.replace` takes (whose
    # search stumbles on every line end); every line ends in CRLF by now.
    message = _DOT_LINE.sub(b"\n..", message)
    return message if message.endswith(b"\r\n") else message + b"\r\n"


_DOT_LINE = re.compile(rb"\n\.")


_PLAIN_ADDRESS = re.compile(r"[^\x00-\x20\x7f<>()\[\]\\,;:\"@]+@[^\x00-\x20\x7f<>()\[\]\\,;:\"@]+")


def _path(address: str) -> str:
    """An address as MAIL FROM and RCPT TO take it: ``<a@b>``. What `smtplib.quoteaddr`
    gives for a plain address, without its RFC 5322 parser (a tenth of the time it took to
    send a message); anything else still goes through that parser."""
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>"
    return smtplib.quoteaddr(address)


def needs_utf8(*addresses: str) -> bool:
    return any(not a.isascii() for a in addresses)
