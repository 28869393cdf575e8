"""Helpers shared by the service tests (no tests here): the long-running commands as real
subprocesses, bulk ledgers, and reading what the sink got without parsing every message."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, insert, select

from newsletter import db, digests
from newsletter.app import App
from newsletter.models import Delivery, DeliveryStatus, Entry, Feed, Subscriber, utcnow
from newsletter.scheduler import plan_due

SECRET = "test-secret-key-not-for-production"
REPO = Path(__file__).parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(db_url: str, smtp_port: int, **settings: object) -> dict[str, str]:
    """Environment for a `newsletter` subprocess: NEWSLETTER_<KEY> for each setting."""
    env = {
        "NEWSLETTER_DATABASE_URL": db_url,
        "NEWSLETTER_SMTP_HOST": "127.0.0.1",
        "NEWSLETTER_SMTP_PORT": str(smtp_port),
        "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_FROM": "Paper Digest <digest@example.org>",
        "NEWSLETTER_BASE_URL": "https://digest.example.org",
        "NEWSLETTER_ENTRY_WINDOW_DAYS": "36500",
        "NEWSLETTER_WORKER_POLL_SECONDS": "0.5",
        "NEWSLETTER_SHUTDOWN_GRACE_SECONDS": "10",
    }
    env.update({f"NEWSLETTER_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class Proc:
    """A `newsletter` command running in the background, its output kept in a file."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, name: str) -> None:
        self.log_path = cwd / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "newsletter", *args],
            env={**os.environ, **env, "COLUMNS": "200"},
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.popen.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM; returns the exit code and how long the exit took."""
        began = time.monotonic()
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        return code, time.monotonic() - began

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for(what: str, check: Callable[[], bool], timeout: float, every: float = 0.1) -> float:
    """Poll until check() is true; returns the seconds it took."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - began


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def metric(base_url: str, name: str) -> float | None:
    """One sample's value from /metrics, or None when unreachable or absent."""
    status, body = http_get(f"{base_url}/metrics", timeout=2)
    if status != 200:
        return None
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def seed(
    app: App, n: int, *, keyword: str = "diffusion", prefix: str = "reader", plan: bool = True
) -> float:
    """n active subscribers due now (UTC, send hour 0) and one matching paper, planned the way
    the service plans them (unless `plan` is false). Returns the seconds planning took."""
    app.init()
    now = utcnow()
    with db.transaction(app.sessions) as session:
        feed = Feed(url=f"https://example.org/{prefix}.xml", title="Example")
        session.add(feed)
        session.flush()
        session.add(
            Entry(
                feed_id=feed.id,
                guid=f"{prefix}-paper",
                title=f"Score-based {keyword} models, a survey",
                summary_text="We review samplers.",
                link="https://example.org/paper",
                fetched_at=now,
            )
        )
        rows: list[dict[str, Any]] = [
            {
                "email": f"{prefix}{i:05d}@example.org",
                "keywords": [keyword],
                "exclude": [],
                "max_items": 1,
                "timezone": "UTC",
                "send_hour": 0,
                "frequency": "daily",
            }
            for i in range(n)
        ]
        for start in range(0, n, 5000):
            session.execute(insert(Subscriber), rows[start : start + 5000])
    if not plan:
        return 0.0
    began = time.monotonic()
    report = plan_due(app, digests.Due(timedelta(hours=24)), now)
    assert report.planned == n, report
    return time.monotonic() - began


def sent_count(app: App) -> int:
    with app.session() as session:
        return int(
            session.scalar(select(func.count()).where(Delivery.status == DeliveryStatus.SENT)) or 0
        )


def status_counts(app: App) -> dict[str, int]:
    with app.session() as session:
        rows = session.execute(select(Delivery.status, func.count()).group_by(Delivery.status))
        return {str(DeliveryStatus(s).value): int(c) for s, c in rows}


def recipients(maildir: Path) -> Counter[str]:
    """How many messages each address got, from the envelope line the sink writes first in
    every file: no MIME parsing, so 20,000 messages take a second."""
    counts: Counter[str] = Counter()
    for sub in ("new", "cur"):
        folder = maildir / sub
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            with open(entry.path, "rb") as f:
                first = f.readline()
            envelope = json.loads(first.split(b": ", 1)[1])
            counts.update(envelope["rcpt_tos"])
    return counts
