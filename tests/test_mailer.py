"""The SMTP client's own framing (newsletter.mailer), against the real sink (aiosmtpd)."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import make_settings

from newsletter.mailer import Connection, Outcome
from newsletter.sink import Sink


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
