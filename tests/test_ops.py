"""/healthz, /metrics and `newsletter status` against real databases and a real SMTP sink:
what they report must be what the ledger, the job runs and the feeds say."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DATA, make_settings, run_cli
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.testclient import TestClient
from test_service_support import free_port, seed, service_env

from newsletter import db, ingest
from newsletter.app import App
from newsletter.jobs import Run, run_job
from newsletter.ops import ops_routes
from newsletter.sending import Sender
from newsletter.service import web_app
from newsletter.sink import Sink
from newsletter.testsmtp import FaultySMTPServer, Rule


@pytest.fixture
def app(db_url: str, sink: Sink) -> Iterator[App]:
    instance = App(make_settings(db_url, sink.port))
    instance.init()
    yield instance
    instance.close()


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_healthz_says_which_part_is_down(app: App, sink: Sink) -> None:
    client = TestClient(Starlette(routes=ops_routes(app)))
    ok = client.get("/healthz")
    assert ok.status_code == 200
    assert ok.json()["status"] == "ok"
    assert {k: v["ok"] for k, v in ok.json()["checks"].items()} == {
        "database": True,
        "smtp": True,
    }
    port = free_port()
    down = App(app.settings.replace(smtp_port=port))
    client = TestClient(Starlette(routes=ops_routes(down)))
    failing = client.get("/healthz")
    assert failing.status_code == 503
    body = failing.json()
    assert body["status"] == "fail"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["smtp"]["ok"] is False
    assert str(port) not in failing.text and "127.0.0.1" not in failing.text, (
        "no addresses or server replies in a public answer"
    )
    down.close()


def test_metrics_read_the_ledger(app: App, tmp_path: Path) -> None:
    rules = {"reader00001@example.org": Rule("reject_rcpt", code=550)}
    rules |= {"reader00002@example.org": Rule("tempfail_data", code=451, times=1)}
    with FaultySMTPServer(rules=rules) as server:
        smtp_app = App(app.settings.replace(smtp_port=server.port))
        seed(smtp_app, 5)
        with db.transaction(app.sessions) as session:
            ingest.add_feed(session, str(DATA / "feeds" / "broken.rss.xml"))
            ingest.add_feed(session, str(tmp_path / "missing.xml"))
        ingest.fetch_all(app)

        def send(run: Run) -> None:
            report = Sender(smtp_app).run()
            run.counts["sent"] = report.sent

        run_job(smtp_app, "send", send)
        smtp_app.close()

    def failing(run: Run) -> None:
        raise RuntimeError("boom")

    run_job(app, "fetch", failing)
    leading = {"now": True}
    client = TestClient(Starlette(routes=ops_routes(app, leader=lambda: leading["now"])))
    got = _samples(client)
    assert got[("newsletter_database_up", ())] == 1
    assert got[("newsletter_deliveries_sent_total", ())] == 4
    assert got[("newsletter_deliveries_failed_total", ())] == 1
    assert got[("newsletter_delivery_retries_total", ())] == 1
    assert got[("newsletter_queue_depth", ())] == 0
    assert got[("newsletter_deliveries", (("status", "sent"),))] == 4
    assert got[("newsletter_feeds_failing", ())] >= 1
    missing = str(tmp_path / "missing.xml")
    assert got[("newsletter_feed_consecutive_failures", (("feed", missing),))] == 1
    assert got[("newsletter_job_runs_total", (("job", "send"),))] == 1
    assert got[("newsletter_job_failures_total", (("job", "send"),))] == 0
    assert got[("newsletter_job_last_success_timestamp_seconds", (("job", "send"),))] > 1.7e9
    assert ("newsletter_job_last_success_timestamp_seconds", (("job", "fetch"),)) not in got
    assert got[("newsletter_job_failures_total", (("job", "fetch"),))] == 1
    assert got[("newsletter_scheduler_leader", ())] == 1
    leading["now"] = False
    assert _samples(client)[("newsletter_scheduler_leader", ())] == 0


def test_metrics_survive_a_database_outage(tmp_path: Path, sink: Sink) -> None:
    gone = App(make_settings(f"sqlite:///{tmp_path / 'never-initialised.db'}", sink.port))
    client = TestClient(Starlette(routes=ops_routes(gone)))
    got = _samples(client)
    assert got[("newsletter_database_up", ())] == 0
    assert got[("newsletter_scheduler_leader", ())] == 0
    assert client.get("/healthz").status_code == 503
    gone.close()


def test_status_at_a_glance(app: App, tmp_path: Path, sink: Sink) -> None:
    seed(app, 3)
    with db.transaction(app.sessions) as session:
        ingest.add_feed(session, str(tmp_path / "missing.xml"))
    ingest.fetch_all(app)
    run_job(app, "plan", lambda run: None)
    env = service_env(app.settings.database_url, sink.port)
    out = run_cli("status", env=env, cwd=tmp_path).stdout
    assert "pending 3  sending 0  sent 0  failed 0" in out
    assert "plan" in out and "ok" in out
    assert "missing.xml" in out and "no such file" in out.lower()
    if app.engine.dialect.name == "sqlite":
        assert "SQLite" in out
    else:
        assert "nobody holds the scheduler lock" in out


def test_ops_routes_come_with_the_web_app_or_alone(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = TestClient(web_app(app, ops_routes(app)))
    assert full.get("/healthz").status_code == 200
    assert full.get("/").status_code == 200, "the subscriber pages are there too"
    monkeypatch.setitem(sys.modules, "newsletter.web", None)  # a build without the web app
    alone = TestClient(web_app(app, ops_routes(app)))
    assert alone.get("/healthz").status_code == 200
    assert alone.get("/").status_code == 404
