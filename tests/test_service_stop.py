"""Graceful stop: SIGTERM while digests are going out over a slow SMTP server. The process
hands back what it has not sent, waits for what is on the wire, exits 0 within
shutdown_grace_seconds, and the next start finishes the period without a duplicate."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from conftest import make_settings
from test_service_support import (
    Proc,
    free_port,
    seed,
    sent_count,
    service_env,
    status_counts,
    wait_for,
)

from newsletter.app import App
from newsletter.testsmtp import FaultySMTPServer, Rule


def _accepted(server: FaultySMTPServer) -> Counter[str]:
    return Counter(r for _, rcpts, _ in server.accepted for r in rcpts)


def test_sigterm_mid_send_then_restart_finishes_without_duplicates(
    db_url: str, tmp_path: Path
) -> None:
    total = 60
    with FaultySMTPServer(rules=lambda address: Rule("slow", delay=0.2)) as server:
        app = App(make_settings(db_url, server.port))
        seed(app, total, plan=False)  # `serve` plans them itself
        env = service_env(db_url, server.port, smtp_connections=4, web_port=free_port())
        first = Proc(["serve"], env, tmp_path, "first")
        try:
            wait_for("some digests out", lambda: len(server.accepted) >= 8, timeout=60)
            code, took = first.stop()
        finally:
            first.kill()
        print(
            f"\nSIGTERM mid-send: exited {code} in {took:.2f}s, {sent_count(app)} of {total} sent"
        )
        assert code == 0, first.output()
        assert took < 10, "within shutdown_grace_seconds"
        assert "stopped cleanly" in first.output()
        counts = status_counts(app)
        assert "sending" not in counts, "nothing left claimed: unsent rows were handed back"
        assert counts["sent"] < total, "the stop landed mid-run"
        assert sum(_accepted(server).values()) == counts["sent"], "every accepted one recorded"

        env["NEWSLETTER_WEB_PORT"] = str(free_port())
        second = Proc(["serve"], env, tmp_path, "second")
        try:
            wait_for("the rest", lambda: sent_count(app) == total, timeout=60)
            assert second.stop()[0] == 0, second.output()
        finally:
            second.kill()
        accepted = _accepted(server)
    assert len(accepted) == total and set(accepted.values()) == {1}, "each exactly once"


STUCK = "stuck00000@example.org"


def test_a_send_that_outlasts_the_grace_period_is_abandoned_and_resumed(
    sqlite_url: str, tmp_path: Path
) -> None:
    rules = {"stuck00000@example.org": Rule("slow", delay=8, times=1)}
    with FaultySMTPServer(rules=rules) as server:
        app = App(make_settings(sqlite_url, server.port))
        seed(app, 1, prefix="stuck")
        env = service_env(
            sqlite_url,
            server.port,
            smtp_connections=1,
            shutdown_grace_seconds=2,
            web_port=free_port(),
        )
        first = Proc(["serve"], env, tmp_path, "first")
        try:
            # Claimed is not enough: the stop must land while the server holds the reply back.
            wait_for("the send to start", lambda: status_counts(app).get("sending") == 1, 30)
            wait_for("the server to stall", lambda: server.fired_for(STUCK) >= 1, 30)
            code, took = first.stop()
        finally:
            first.kill()
        print(f"\nstuck send: exited {code} after {took:.1f}s (grace 2s)")
        assert code == 0 and took < 5, first.output()
        assert "did not stop within 2s" in first.output()
        assert status_counts(app) == {"sending": 1}, "left claimed, for the next start"

        env["NEWSLETTER_WEB_PORT"] = str(free_port())
        second = Proc(["serve"], env, tmp_path, "second")
        try:  # a dead process on this host: its claim is taken over at once, not after 300s
            wait_for("the resend", lambda: sent_count(app) == 1, timeout=30)
            assert second.stop()[0] == 0
        finally:
            second.kill()
        assert _accepted(server) == Counter({"stuck00000@example.org": 1})
