"""The SMTP client's own framing (newsletter.mailer), against the real sink (aiosmtpd)."""

from __future__ import annotations

import select
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import make_settings
from hypothesis import given
from hypothesis import strategies as st

from newsletter import lanes, mailer
from newsletter.mailer import Connection, Outcome
from newsletter.sink import Sink
from newsletter.testsmtp import FaultySMTPServer, Rule


def _wait_for(sink: Sink, count: int) -> None:
    deadline = time.monotonic() + 5
    while sink.received_count < count and time.monotonic() < deadline:
        time.sleep(0.02)


def test_dot_stuffing_and_line_ends_arrive_exactly(tmp_path: Path, sink: Sink) -> None:
    """Lines that start with a dot, a lone dot line and stray bare line ends: the server
    must receive the very message (with CRLF line ends), never an early end of data."""
    conn = Connection(make_settings("sqlite://", sink.port))
    crlf = b"Subject: dots\r\n\r\n.starts with a dot\r\n.\r\n..two\r\nlast line"
    bare = b"Subject: bare\n\n.dot after LF\rCR only\nend\n"
    try:
        assert conn.send("a@example.org", "b@example.org", crlf).outcome is Outcome.SENT
        assert conn.send("a@example.org", "b@example.org", bare).outcome is Outcome.SENT
    finally:
        conn.close()
    _wait_for(sink, 2)
    raws = sorted(m.raw for m in sink.messages())
    assert raws == sorted(
        [
            crlf + b"\r\n",
            b"Subject: bare\r\n\r\n.dot after LF\r\nCR only\r\nend\r\n",
        ]
    )


def test_a_message_without_its_final_dot_is_never_delivered(sink: Sink) -> None:
    """`begin` sends everything but the dot; closing instead of `end` (a stop, a crash)
    must leave the server with nothing, and the next connection works as usual."""
    settings = make_settings("sqlite://", sink.port)
    conn = Connection(settings)
    assert conn.begin("a@example.org", "b@example.org", b"Subject: held\r\n\r\nbody\r\n") is None
    conn.close()
    conn = Connection(settings)
    try:
        result = conn.send("a@example.org", "c@example.org", b"Subject: next\r\n\r\nbody\r\n")
    finally:
        conn.close()
    assert result.outcome is Outcome.SENT
    _wait_for(sink, 1)
    time.sleep(0.2)  # a wrongly delivered first message would have arrived by now
    assert [m.subject for m in sink.messages()] == ["next"]


class _StrictPipeliningServer:
    """A scripted SMTP server on a real socket that answers MAIL, RCPT and DATA only once
    all three have arrived (waiting up to two seconds): a client that waits for each reply
    in turn is seen, because its RCPT and DATA come late."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.commands_before_first_reply: list[bytes] = []
        self.message = b""
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        conn.settimeout(5)
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 strict ESMTP\r\n")
            lines.readline()  # EHLO
            conn.sendall(b"250-strict\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            conn.settimeout(2)
            try:
                while self.commands_before_first_reply[-1:] != [b"DATA"]:
                    self.commands_before_first_reply.append(lines.readline().strip())
            except TimeoutError:
                pass
            conn.settimeout(5)
            conn.sendall(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
            while not self.message.endswith(b"\r\n.\r\n"):
                self.message += lines.readline()
            conn.sendall(b"250 2.0.0 queued as STRICT\r\n")
            lines.readline()  # QUIT
            conn.sendall(b"221 bye\r\n")

    def close(self) -> None:
        self._thread.join(10)
        self._listener.close()


def test_mail_rcpt_and_data_go_out_together_where_the_server_pipelines() -> None:
    server = _StrictPipeliningServer()
    conn = Connection(make_settings("sqlite://", server.port))
    try:
        result = conn.send("a@example.org", "b@example.org", b"Subject: one trip\r\n\r\nhi\r\n")
    finally:
        conn.close()
        server.close()
    assert result.outcome is Outcome.SENT and "STRICT" in result.reply
    assert server.commands_before_first_reply == [
        b"MAIL FROM:<a@example.org>",
        b"RCPT TO:<b@example.org>",
        b"DATA",
    ]
    assert server.message == b"Subject: one trip\r\n\r\nhi\r\n.\r\n"


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
def test_refusals_are_classified_the_same_with_and_without_pipelining(pipelining: bool) -> None:
    """A refused recipient, a 421 that closes the session and a refusal at the end of
    DATA: each is reported against its stage, and the connection carries on (reconnecting
    after the 421) to deliver the next message."""
    rules = {
        "gone@example.org": Rule("reject_rcpt", 550),
        "closing@example.org": Rule("reject_rcpt", 421),
        "busy@example.org": Rule("tempfail_data", 451),
    }
    with FaultySMTPServer(rules=rules, pipelining=pipelining) as server:
        conn = Connection(make_settings("sqlite://", server.port))
        message = b"Subject: x\r\n\r\nbody\r\n"
        try:
            outcomes = {
                rcpt: conn.send("a@example.org", rcpt, message)
                for rcpt in [
                    "gone@example.org",
                    "ok1@example.org",
                    "closing@example.org",
                    "ok2@example.org",
                    "busy@example.org",
                    "ok3@example.org",
                ]
            }
        finally:
            conn.close()
        delivered = sorted(rcpt for _, rcpts, _ in server.accepted for rcpt in rcpts)
    summary = {rcpt: (r.outcome, r.code, r.stage) for rcpt, r in outcomes.items()}
    assert summary == {
        "gone@example.org": (Outcome.PERMANENT, 550, "rcpt"),
        "ok1@example.org": (Outcome.SENT, 250, "data"),
        "closing@example.org": (Outcome.TEMPORARY, 421, "rcpt"),
        "ok2@example.org": (Outcome.SENT, 250, "data"),
        "busy@example.org": (Outcome.TEMPORARY, 451, "data"),
        "ok3@example.org": (Outcome.SENT, 250, "data"),
    }
    assert delivered == ["ok1@example.org", "ok2@example.org", "ok3@example.org"]


_ADDRESS_CHARS = st.sampled_from(
    [*list("ab.+-_'&%!#$*/=?^`{|}~ \t\"()<>[],;:\\@"), "\r", "\n", "é"]
)


@given(st.text(_ADDRESS_CHARS, max_size=14))
def test_envelope_addresses_are_what_smtplib_would_send(address: str) -> None:
    """MAIL FROM and RCPT TO skip smtplib's address parser for plain addresses; for any
    text, line breaks included, the command carries what `smtplib.quoteaddr` gives."""
    assert mailer._path(address) == smtplib.quoteaddr(address)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
def test_lanes_report_each_outcome_against_its_own_message(pipelining: bool) -> None:
    """One thread drives a connection (lanes.Lane): a message's final dot goes with the next
    message's MAIL, RCPT and DATA where the server pipelines. Every outcome is still reported
    against its own message and stage, a refusal of one message does not spill onto the
    next, and what a dropped or closed connection cut off is reported as not sent (None), to
    be begun again on a new connection."""
    rules = {
        "gone@example.org": Rule("reject_rcpt", 550),
        "closing@example.org": Rule("reject_rcpt", 421),
        "busy@example.org": Rule("tempfail_data", 451),
        "dropped@example.org": Rule("drop_in_data"),
        "hangup@example.org": Rule("tempfail_data", 421),
    }
    order = [
        "ok1@example.org",
        "gone@example.org",
        "ok2@example.org",
        "busy@example.org",
        "ok3@example.org",
        "closing@example.org",
        "dropped@example.org",
        "ok4@example.org",
        "hangup@example.org",
        "ok5@example.org",
    ]
    body = b"Subject: x\r\n\r\n.body\r\n"
    results: dict[str, list[mailer.Result | None]] = {}

    def report(message: lanes.Message[str], result: mailer.Result | None) -> None:
        results.setdefault(message.token, []).append(result)
        if result is None:
            todo.insert(0, message.token)  # not begun: start it again

    with FaultySMTPServer(rules=rules, pipelining=pipelining) as server:
        settings = make_settings("sqlite://", server.port)
        lane: lanes.Lane[str] = lanes.Lane(settings, report)
        todo = list(order)
        deadline = time.monotonic() + 20
        while todo or lane.busy or lane.held is not None:
            assert time.monotonic() < deadline, results
            if not lane.open and lane.held is None:
                lane.attach(mailer.open_smtp(settings))
            message = (
                lanes.Message(todo[0], "a@example.org", todo[0], mailer.stuffed(body))
                if todo
                else None
            )
            if lane.held is not None and not lane.busy:
                if lane.finish(message):
                    todo.pop(0)
            elif lane.idle and message is not None:
                todo.pop(0)
                lane.begin(message)
            if lane.open:
                readable, writable, _ = select.select(
                    [lane.sock], [lane.sock] if lane.wants_write else [], [], 0.05
                )
                if writable:
                    lane.on_writable()
                if readable:
                    lane.on_readable()
        lane.quit()
        delivered = [(rcpts, data) for _, rcpts, data in server.accepted]
    summary = {
        rcpt: [(r.outcome, r.code, r.stage) if r else None for r in got]
        for rcpt, got in results.items()
    }
    sent = [(Outcome.SENT, 250, "data")]
    assert summary["ok1@example.org"] == sent
    assert summary["gone@example.org"] == [(Outcome.PERMANENT, 550, "rcpt")]
    assert summary["busy@example.org"] == [(Outcome.TEMPORARY, 451, "data")]
    assert summary["closing@example.org"] == [(Outcome.TEMPORARY, 421, "rcpt")]
    assert summary["dropped@example.org"] == [(Outcome.TEMPORARY, None, "data")]
    assert summary["hangup@example.org"] == [(Outcome.TEMPORARY, 421, "data")]
    for ok in ("ok2@example.org", "ok3@example.org", "ok4@example.org", "ok5@example.org"):
        assert summary[ok][-1] == sent[0] and set(summary[ok][:-1]) <= {None}, summary[ok]
    assert sorted(r for rcpts, _ in delivered for r in rcpts) == [
        f"ok{n}@example.org" for n in range(1, 6)
    ], "each delivered exactly once"
    assert all(data == body for _, data in delivered)
