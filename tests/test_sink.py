"""The development SMTP sink and the fault-injecting test server, over real sockets.

smtplib is the client throughout, because what matters is what a real client sees.
"""

from __future__ import annotations

import email.policy
import mailbox
import os
import queue
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import IO

import pytest

from newsletter.sink import (
    DATA_SIZE_LIMIT,
    Sink,
    SinkMessage,
    clear,
    count_messages,
    format_line,
    list_messages,
)
from newsletter.testsmtp import FaultySMTPServer, Rule

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_raw(subject: str = "hello", body: str = "Hi.\r\n", to: str = "b@example.org") -> bytes:
    return (
        f"From: a@example.org\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{time.monotonic_ns()}@example.org>\r\n\r\n{body}"
    ).encode()


def send(
    port: int,
    raw: bytes,
    rcpts: list[str] | None = None,
    mail_from: str = "a@example.org",
    **kwargs: list[str],
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        return client.sendmail(mail_from, rcpts or ["b@example.org"], raw, **kwargs)


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    return tmp_path / "mail"


@pytest.fixture
def sink(maildir: Path) -> Iterator[Sink]:
    with Sink(maildir, port=0) as running:
        yield running


# --- Sink -----------------------------------------------------------------------------------


def test_message_is_stored_with_envelope_decoded_subject_and_exact_bytes(sink: Sink) -> None:
    raw = (
        b"From: Alice <a@example.org>\r\n"
        b"To: b@example.org\r\n"
        b"Subject: =?utf-8?q?Schr=C3=B6dinger=27s_cat?=\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b".a line that smtplib dot-stuffs\r\n"
        b"..and another\r\n"
        b"caf\xc3\xa9 \r\n"
        b".\r\n"
    )
    before = datetime.now(UTC)
    refused = send(
        sink.port,
        raw,
        ["b@example.org", "c@example.org"],
        mail_from="bounces@example.org",
        mail_options=["BODY=8BITMIME"],
    )
    assert refused == {}

    [msg] = sink.messages()
    assert msg.mail_from == "bounces@example.org"
    assert msg.rcpt_tos == ("b@example.org", "c@example.org")
    assert msg.subject == "Schrödinger's cat"
    assert msg.raw == raw
    assert msg.message["To"] == "b@example.org"
    assert msg.message.get_content().splitlines()[:3] == [
        ".a line that smtplib dot-stuffs",
        "..and another",
        "café ",
    ]
    assert before <= msg.received_at <= datetime.now(UTC)
    assert msg.received_at.tzinfo is not None
    # A standard Maildir: other tools find the message under the same key.
    assert mailbox.Maildir(sink.maildir, create=False).get_bytes(msg.key).endswith(raw)


def test_smtputf8_addresses_and_raw_utf8_headers_are_accepted(sink: Sink) -> None:
    raw = "From: jörg@exämple.org\r\nSubject: Schrödinger\r\n\r\nGrüße\r\n".encode()
    send(
        sink.port, raw, ["zoë@exämple.org"], mail_from="jörg@exämple.org", mail_options=["SMTPUTF8"]
    )

    [msg] = sink.messages()
    assert (msg.mail_from, msg.rcpt_tos) == ("jörg@exämple.org", ("zoë@exämple.org",))
    assert msg.subject == "Schrödinger"
    assert msg.raw == raw


def test_null_sender_is_reported_as_empty(sink: Sink) -> None:
    send(sink.port, make_raw("bounce"), mail_from="")

    [msg] = sink.messages()
    assert msg.mail_from == ""
    assert "  <> -> b@example.org  " in format_line(msg)


def test_large_message_is_accepted_and_oversized_one_refused(sink: Sink) -> None:
    line = b"x" * 76 + b"\r\n"
    raw = make_raw("big") + line * (4 * 1024 * 1024 // len(line))
    send(sink.port, raw)
    assert [m.raw for m in sink.messages()] == [raw]

    # smtplib declares SIZE, so the refusal comes before any data is sent.
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send(sink.port, b"x" * (DATA_SIZE_LIMIT + 1))
    assert refused.value.smtp_code == 552
    assert count_messages(sink.maildir) == 1


def test_listing_works_without_a_running_sink_and_oldest_comes_first(
    sink: Sink, maildir: Path
) -> None:
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=30) as client:
        for n in range(5):
            client.sendmail("a@example.org", ["b@example.org"], make_raw(f"number {n}"))
    sink.stop()

    listed = list_messages(maildir)
    assert [m.subject for m in listed] == [f"number {n}" for n in range(5)]
    assert count_messages(maildir) == 5
    assert list_messages(maildir.parent / "never-created") == []
    assert count_messages(maildir.parent / "never-created") == 0


def test_restart_reuses_port_and_keeps_earlier_messages(sink: Sink) -> None:
    port = sink.port
    send(port, make_raw("before"))
    sink.stop()
    with pytest.raises(OSError):
        send(port, make_raw("while stopped"))

    sink.start()
    assert sink.port == port
    send(port, make_raw("after"))
    assert [m.subject for m in sink.messages()] == ["before", "after"]


def test_start_fails_loudly_when_the_port_is_taken(sink: Sink, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Sink(tmp_path / "other", port=sink.port).start()


def test_clear_deletes_everything_and_counts(sink: Sink, maildir: Path) -> None:
    for n in range(3):
        send(sink.port, make_raw(f"m{n}"))
    # A message a mail client has already seen lives in cur/; it goes too.
    first = sink.messages()[0]
    os.rename(maildir / "new" / first.key, maildir / "cur" / f"{first.key}:2,S")

    assert clear(maildir) == 3
    assert sink.messages() == []
    assert clear(maildir) == 0
    send(sink.port, make_raw("after clear"))
    assert [m.subject for m in sink.messages()] == ["after clear"]


def test_foreign_files_in_the_maildir_are_listed(sink: Sink, maildir: Path) -> None:
    raw = make_raw("dropped in by hand")
    (maildir / "new" / "1700000000.M1P1Q1.elsewhere").write_bytes(raw)
    (maildir / "new" / ".hidden").write_bytes(b"not a message")

    [msg] = list_messages(maildir)
    assert (msg.key, msg.subject, msg.raw, msg.mail_from) == (
        "1700000000.M1P1Q1.elsewhere",
        "dropped in by hand",
        raw,
        "",
    )


def test_on_message_sees_each_message_and_its_failure_does_not_bounce(maildir: Path) -> None:
    seen: list[SinkMessage] = []

    def on_message(msg: SinkMessage) -> None:
        seen.append(msg)
        if msg.subject == "boom":
            raise RuntimeError("callback bug")

    with Sink(maildir, port=0, on_message=on_message) as sink:
        send(sink.port, make_raw("boom"))
        send(sink.port, make_raw("fine"))
        assert [m.subject for m in seen] == ["boom", "fine"]
        assert [m.subject for m in sink.messages()] == ["boom", "fine"]
        assert seen[1].key == sink.messages()[1].key
        assert sink.received_count == 2


def test_concurrent_senders_all_get_stored(sink: Sink) -> None:
    threads, per_thread = 8, 50

    def sender(t: int) -> int:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=60) as client:
            for n in range(per_thread):
                client.sendmail("a@example.org", [f"r{t}@example.org"], make_raw(f"{t}/{n}"))
        return per_thread

    with ThreadPoolExecutor(threads) as pool:
        assert sum(pool.map(sender, range(threads))) == threads * per_thread

    assert sink.received_count == threads * per_thread
    messages = sink.messages()
    assert {m.subject for m in messages} == {
        f"{t}/{n}" for t in range(threads) for n in range(per_thread)
    }
    assert len({m.key for m in messages}) == threads * per_thread
    # Each connection's messages are listed in the order it sent them.
    for t in range(threads):
        mine = [m.subject for m in messages if m.rcpt_tos == (f"r{t}@example.org",)]
        assert mine == [f"{t}/{n}" for n in range(per_thread)]


def test_format_line() -> None:
    raw = make_raw("Weekly digest")
    msg = SinkMessage(
        key="k",
        received_at=datetime(2024, 5, 1, 7, 8, 9, 123456, tzinfo=UTC),
        mail_from="news@example.org",
        rcpt_tos=("a@example.org", "b@example.org", "c@example.org", "d@e.org", "f@g.org"),
        subject="  Weekly\t digest\n",
        message=BytesParser(_class=EmailMessage, policy=email.policy.default).parsebytes(raw),
        raw=b"x" * 3300,
    )
    assert format_line(msg) == (
        "2024-05-01 07:08:09Z  news@example.org -> a@example.org, b@example.org, "
        'c@example.org +2 more  "Weekly digest"  3.2 KiB'
    )
    empty = replace(msg, mail_from="", rcpt_tos=("a@example.org",), subject="", raw=b"x" * 999)
    assert format_line(empty) == '2024-05-01 07:08:09Z  <> -> a@example.org  "(no subject)"  999 B'


def pump_lines(stream: IO[str], into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))


def test_run_forever_prints_where_it_listens_and_one_line_per_message(maildir: Path) -> None:
    code = (
        "import sys; from newsletter.sink import run_forever; "
        "run_forever(sys.argv[1], '127.0.0.1', 0)"
    )
    lines: queue.Queue[str] = queue.Queue()
    with subprocess.Popen(
        [sys.executable, "-c", code, str(maildir)],
        stdout=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    ) as proc:
        assert proc.stdout is not None
        reader = threading.Thread(target=pump_lines, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            startup = lines.get(timeout=60)
            match = re.fullmatch(
                r"SMTP sink listening on 127\.0\.0\.1:(\d+), keeping messages in the Maildir (.+)",
                startup,
            )
            assert match, startup
            assert Path(match[2]) == maildir.resolve()

            send(int(match[1]), make_raw("=?utf-8?q?Schr=C3=B6dinger?="), ["x@example.org"])
            echoed = lines.get(timeout=30)
            [stored] = list_messages(maildir)
            assert echoed == format_line(stored)
            assert re.fullmatch(
                r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ  "
                r'a@example\.org -> x@example\.org  "Schrödinger"  \d+ B',
                echoed,
            ), echoed

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            assert lines.get(timeout=10) == "SMTP sink stopped after receiving 1 message(s)"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reader.join(timeout=10)


# --- FaultySMTPServer -----------------------------------------------------------------------


def test_reject_rcpt_refuses_only_that_recipient() -> None:
    with FaultySMTPServer(rules={"Bad@Example.org": Rule("reject_rcpt", code=550)}) as server:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            send(server.port, make_raw(), ["bad@example.org"])
        assert refused.value.recipients["bad@example.org"][0] == 550

        # In a batch the good recipient still gets the message.
        assert send(server.port, make_raw(), ["good@example.org", "bad@example.org"]) == {
            "bad@example.org": (550, b"5.1.1 <bad@example.org>: recipient rejected by test rule")
        }
        assert server.accepted_for("good@example.org") == 1
        assert server.accepted_for("bad@example.org") == 0
        assert [rcpts for _, rcpts, _ in server.accepted] == [("good@example.org",)]


def test_tempfail_data_applies_the_given_number_of_times_then_accepts() -> None:
    raw = make_raw("retry me")
    with FaultySMTPServer(rules={"r@example.org": Rule("tempfail_data", 451, times=2)}) as server:
        for _ in range(2):
            with pytest.raises(smtplib.SMTPDataError) as failed:
                send(server.port, raw, ["r@example.org"])
            assert failed.value.smtp_code == 451
        assert server.accepted_for("r@example.org") == 0

        send(server.port, raw, ["r@example.org"])
        assert server.accepted == [("a@example.org", ("r@example.org",), raw)]
        assert server.accepted_for("r@example.org") == 1
        # Another recipient on the same server was never affected.
        send(server.port, raw, ["other@example.org"])
        assert server.accepted_for("other@example.org") == 1


def test_421_at_data_closes_the_connection() -> None:
    with (
        FaultySMTPServer(rules={"r@example.org": Rule("tempfail_data", code=421)}) as server,
        smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client,
    ):
        client.ehlo()
        client.mail("a@example.org")
        client.rcpt("r@example.org")
        code, _ = client.data(make_raw())
        assert code == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
        assert server.accepted == []


def test_drop_in_data_disconnects_without_reply_and_times_1_lets_a_retry_through() -> None:
    with FaultySMTPServer(rules={"r@example.org": Rule("drop_in_data", times=1)}) as server:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            send(server.port, make_raw("first"), ["r@example.org"])
        assert server.accepted_for("r@example.org") == 0

        send(server.port, make_raw("retry"), ["r@example.org"])
        assert server.accepted_for("r@example.org") == 1


def test_reject_rcpt_times_1_then_succeeds_on_retry() -> None:
    with FaultySMTPServer(rules={"r@example.org": Rule("reject_rcpt", 450, times=1)}) as server:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            send(server.port, make_raw(), ["r@example.org"])
        assert refused.value.recipients["r@example.org"][0] == 450
        send(server.port, make_raw(), ["r@example.org"])
        assert server.accepted_for("r@example.org") == 1


def test_slow_delays_rcpt_and_data_replies() -> None:
    delay = 0.15
    rules = {"slow@example.org": Rule("slow", delay=delay)}
    with FaultySMTPServer(rules=rules) as server:
        started = time.monotonic()
        send(server.port, make_raw(), ["fast@example.org"])
        fast = time.monotonic() - started

        started = time.monotonic()
        send(server.port, make_raw(), ["slow@example.org"])
        slow = time.monotonic() - started

    assert slow >= 2 * delay
    assert fast < delay
    assert server.accepted_for("slow@example.org") == 1


def test_rules_can_be_a_function_of_the_address() -> None:
    def rules(address: str) -> Rule | None:
        return Rule("reject_rcpt", 553) if address.endswith("@blocked.example") else None

    with FaultySMTPServer(rules=rules) as server:
        refused = send(server.port, make_raw(), ["x@blocked.example", "y@example.org"])
        assert refused["x@blocked.example"][0] == 553
        assert (server.accepted_for("x@blocked.example"), server.accepted_for("y@example.org")) == (
            0,
            1,
        )


def outcomes_with_random_faults(seed: int, n: int) -> tuple[list[str], int]:
    outcomes = []
    with FaultySMTPServer(random_faults=0.5, seed=seed) as server:
        for i in range(n):
            try:
                send(server.port, make_raw(f"m{i}"))
                outcomes.append("ok")
            except smtplib.SMTPDataError as exc:
                outcomes.append(str(exc.smtp_code))
            except smtplib.SMTPServerDisconnected:
                outcomes.append("drop")
        return outcomes, len(server.accepted)


def test_random_faults_are_transient_and_reproducible_with_a_seed() -> None:
    first, accepted = outcomes_with_random_faults(seed=7, n=30)
    again, _ = outcomes_with_random_faults(seed=7, n=30)
    other, _ = outcomes_with_random_faults(seed=8, n=30)

    assert first == again
    assert first != other
    assert set(first) == {"ok", "421", "451", "drop"}
    assert accepted == first.count("ok")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"action": "tempfail_data"},  # the default code 550 is not a temporary failure
        {"action": "reject_rcpt", "code": 250},
        {"action": "slow"},
        {"action": "drop_in_data", "times": 0},
        {"action": "explode"},
    ],
)
def test_rules_that_would_test_nothing_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Rule(**kwargs)  # type: ignore[arg-type]
