"""End to end: `newsletter send` for N subscribers into (a) the product's own sink and (b)
Postfix's `smtp-sink`, on SQLite and on PostgreSQL. Digests per second and peak RSS of the
`send` process, beside the ceiling of this machine: Postfix's C client `smtp-source` against the
same `smtp-sink` with messages of the same size.

    .venv/bin/python benchmarks/bench_send.py [--subscribers 10000] [--db sqlite,postgresql]
        [--sink smtp-sink,newsletter] [--json PATH]

PostgreSQL comes from NEWSLETTER_TEST_DATABASE_URL (default postgresql+psycopg://postgres@
127.0.0.1:5432/test); each run uses a fresh schema. `smtp-sink` and `smtp-source` come with
Debian's `postfix` package (`./dev bench` installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, func, make_url, select, text

from benchmarks.datagen import populate
from newsletter.app import App
from newsletter.config import Settings
from newsletter.models import Delivery, DeliveryStatus

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SECRET = "bench-secret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'bench.db'}"
        return
    base = os.environ.get("NEWSLETTER_TEST_DATABASE_URL", PG_DEFAULT)
    schema = f"bench_{os.getpid()}_{int(time.time())}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def sink(kind: str, tmp: Path) -> Iterator[int]:
    port = free_port()
    if kind == "smtp-sink":
        cmd = ["smtp-sink", "-u", "root", f"127.0.0.1:{port}", "1000"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "newsletter",
            "sink",
            "--port",
            str(port),
            "--dir",
            str(tmp / "maildir"),
        ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


# Runs the command it is given and reports on it: started from this small process, not from
# the harness itself, because a child's peak RSS counts the memory it shares with its parent
# between fork and exec, and after loading 100,000 subscribers the harness holds ~300 MB.
_LAUNCH = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"wall": time.perf_counter() - t0, "exit": os.waitstatus_to_exitcode(status),
                  "maxrss_kib": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime}))
"""


@dataclass
class SendRun:
    wall: float
    exit: int
    peak_rss_kib: int
    cpu_s: float  # user + system of `send` and its helper processes


def run_send(env: dict[str, str]) -> SendRun:
    """One `newsletter send`: wall seconds, exit code, peak RSS of its largest process and
    CPU of all of them, from wait4's rusage of that very command."""
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCH, sys.executable, "-m", "newsletter", "send"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    if figures["exit"] != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
    return SendRun(figures["wall"], figures["exit"], figures["maxrss_kib"], figures["cpu"])


def server_cpu(name: str) -> float:
    """CPU seconds used so far by every process named `name` (PostgreSQL's server shares the
    machine with `send`: what it costs belongs beside the figures), including its children
    that have exited (PostgreSQL's backends end with their connections)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.index("(") + 1 : text.rindex(")")].startswith(name):
            fields = text.rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def ceiling(message_bytes: int, count: int) -> float | None:
    """Messages/s of Postfix's C client against smtp-sink: what this machine can move."""
    if not shutil.which("smtp-source"):
        return None
    port = free_port()
    proc = subprocess.Popen(
        ["smtp-sink", "-u", "root", f"127.0.0.1:{port}", "1000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        t0 = time.perf_counter()
        subprocess.run(
            [
                "smtp-source",
                "-s",
                "8",
                "-l",
                str(message_bytes),
                "-m",
                str(count),
                "-f",
                "a@example.org",
                "-t",
                "b@example.org",
                f"127.0.0.1:{port}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return count / (time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(10)


def one(db_kind: str, sink_kind: str, subscribers: int, entries: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        with database(db_kind, tmp) as url:
            app = App(Settings(database_url=url, secret_key=SECRET))
            app.init()
            t0 = time.perf_counter()
            populate(app, entries=entries, subscribers=subscribers)
            load_s = time.perf_counter() - t0
            with sink(sink_kind, tmp) as port:
                env = {
                    "NEWSLETTER_DATABASE_URL": url,
                    "NEWSLETTER_SMTP_PORT": str(port),
                    "NEWSLETTER_SECRET_KEY": SECRET,
                    "NEWSLETTER_FROM": "Paper Digest <digest@example.org>",
                }
                db_cpu = server_cpu("postgres")
                sent_run = run_send(env)
                db_cpu = server_cpu("postgres") - db_cpu
            with app.session() as session:
                sent = (
                    session.scalar(
                        select(func.count()).where(Delivery.status == DeliveryStatus.SENT)
                    )
                    or 0
                )
            app.close()
        return {
            "db": db_kind,
            "sink": sink_kind,
            "subscribers": subscribers,
            "sent": sent,
            "exit": sent_run.exit,
            "seconds": round(sent_run.wall, 2),
            "digests_per_s": round(sent / sent_run.wall, 1),
            "peak_rss_mb": round(sent_run.peak_rss_kib / 1024, 1),
            "send_cpu_s": round(sent_run.cpu_s, 1),
            "db_server_cpu_s": round(db_cpu, 1) if db_kind == "postgresql" else None,
            "load_s": round(load_s, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", default="10000", help="comma-separated sizes")
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--sink", default="smtp-sink,newsletter")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for size in (int(s) for s in args.subscribers.split(",")):
        for db_kind in args.db.split(","):
            for sink_kind in args.sink.split(","):
                if sink_kind == "smtp-sink" and not shutil.which("smtp-sink"):
                    print("smtp-sink missing: install Debian's postfix", file=sys.stderr)
                    continue
                row = one(db_kind, sink_kind, size, args.entries)
                print(json.dumps(row))
                rows.append(row)
    top = ceiling(30_000, 20_000)
    result = {"runs": rows, "smtp_source_ceiling_msgs_per_s": round(top, 1) if top else None}
    top_text = result["smtp_source_ceiling_msgs_per_s"]
    print(f"ceiling (smtp-source -> smtp-sink, 30 KB messages): {top_text}/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
