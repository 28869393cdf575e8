"""One scheduler at a time on PostgreSQL: the advisory lock, and two real `serve` processes
of which one leads and the other takes over when the leader is killed."""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_settings, run_cli
from sqlalchemy import create_engine, make_url, text
from test_service_support import Proc, free_port, metric, service_env, wait_for

from newsletter.app import App
from newsletter.leader import AdvisoryLockLeadership, lock_holder
from newsletter.sink import Sink

pytestmark = pytest.mark.postgres


@pytest.fixture
def other_schema_url(pg_base_url: str) -> Iterator[str]:
    schema = f"t_other_{secrets.token_hex(4)}"
    admin = create_engine(pg_base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(pg_base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def test_advisory_lock_one_holder_per_schema(pg_url: str, other_schema_url: str) -> None:
    first, second = AdvisoryLockLeadership(pg_url), AdvisoryLockLeadership(pg_url)
    elsewhere = AdvisoryLockLeadership(other_schema_url)
    try:
        assert first.acquire() and first.check()
        assert not second.acquire(), "the lock is taken"
        assert elsewhere.acquire(), "another schema is another deployment"
        app = App(make_settings(pg_url, 1))
        holder = lock_holder(app.engine)
        assert holder is not None and holder.application.startswith("newsletter scheduler")
        app.close()
        first.release()
        assert not first.held
        assert second.acquire(), "released: the standby takes it"
    finally:
        for leadership in (first, second, elsewhere):
            leadership.close()


def test_lock_dies_with_its_connection(pg_url: str, pg_base_url: str) -> None:
    leader, standby = AdvisoryLockLeadership(pg_url), AdvisoryLockLeadership(pg_url)
    try:
        assert leader.acquire()
        app = App(make_settings(pg_url, 1))
        holder = lock_holder(app.engine)
        app.close()
        assert holder is not None
        admin = create_engine(pg_base_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:  # as if the leader's machine vanished
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": holder.pid})
        admin.dispose()
        wait_for("the lock to be free", standby.acquire, timeout=10, every=0.2)
        assert not leader.check(), "the old leader notices it no longer leads"
    finally:
        leader.close()
        standby.close()


def test_two_serve_one_leads_the_other_takes_over(pg_url: str, sink: Sink, tmp_path: Path) -> None:
    app = App(make_settings(pg_url, sink.port))
    app.init()
    app.close()
    ports = [free_port(), free_port()]
    procs = [
        Proc(
            ["serve", "--port", str(port)],
            service_env(pg_url, sink.port, log_json="true"),
            tmp_path,
            f"serve{i}",
        )
        for i, port in enumerate(ports)
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url in urls:
            wait_for(
                f"{url} to answer",
                lambda u=url: metric(u, "newsletter_scheduler_leader") is not None,  # type: ignore[misc]
                timeout=30,
            )
        wait_for(
            "a leader",
            lambda: sum(metric(u, "newsletter_scheduler_leader") or 0 for u in urls) == 1,
            timeout=15,
        )
        time.sleep(4)  # longer than a standby's poll: still exactly one
        leaders = [metric(u, "newsletter_scheduler_leader") or 0.0 for u in urls]
        assert sorted(leaders) == [0.0, 1.0], leaders
        lead = leaders.index(1.0)
        standby = 1 - lead
        assert '"job": "plan"' in procs[lead].output(), "the leader plans"
        assert '"job": "plan"' not in procs[standby].output(), "the standby does not"
        status = run_cli("status", env=service_env(pg_url, sink.port), cwd=tmp_path)
        assert "newsletter scheduler" in status.stdout, status.stdout

        procs[lead].signal(signal.SIGKILL)
        procs[lead].wait()
        took = wait_for(
            "the standby to take over",
            lambda: metric(urls[standby], "newsletter_scheduler_leader") == 1.0,
            timeout=20,
        )
        print(f"\nleader SIGKILLed; the standby took over in {took:.1f}s")
        assert took < 10
        code, stopped_in = procs[standby].stop()
        assert code == 0, procs[standby].output()
        assert stopped_in < 10
        log = procs[standby].output()
        assert '"message": "this process leads: the scheduler runs here"' in log
        assert '"run_id": ' in log and '"job": "plan"' in log, "JSON lines carry the run"
    finally:
        for proc in procs:
            proc.kill()
