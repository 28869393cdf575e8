from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import ATOM_FIXTURE, RSS_FIXTURE, make_settings
from sqlalchemy import func, select

from newsletter import db, ingest
from newsletter.app import App
from newsletter.models import Entry, Feed

RSS = RSS_FIXTURE.read_bytes()


@pytest.fixture
def app(db_url: str) -> Iterator[App]:
    instance = App(make_settings(db_url, 1025))
    instance.init()
    yield instance
    instance.close()


def _add(app: App, source: str) -> int:
    with db.transaction(app.sessions) as session:
        return ingest.add_feed(session, source).id


def _entries(app: App, feed_id: int | None = None) -> int:
    with app.session() as session:
        query = select(func.count()).select_from(Entry)
        if feed_id is not None:
            query = query.where(Entry.feed_id == feed_id)
        return int(session.scalar(query) or 0)


def test_fixture_feeds_stored_once_per_feed_and_id(app: App) -> None:
    rss, atom = _add(app, str(RSS_FIXTURE)), _add(app, str(ATOM_FIXTURE))
    reports = ingest.fetch_all(app)
    assert [r.new_entries for r in reports] == [44, 44]
    assert _entries(app, rss) == 44 and _entries(app, atom) == 44
    again = ingest.fetch_all(app)
    assert [r.new_entries for r in again] == [0, 0]
    assert _entries(app) == 88
    with app.session() as session:
        entry = session.scalar(select(Entry).where(Entry.title == "Light Schrödinger Bridge"))
        feed = session.get(Feed, rss)
    assert entry is not None and not entry.summary_text.startswith("Announce Type")
    assert entry.published is not None and entry.published.tzinfo is not None
    assert feed is not None and feed.title == "Daily Papers" and feed.last_success_at


def test_adding_the_same_feed_twice_is_refused(app: App) -> None:
    _add(app, str(RSS_FIXTURE))
    with pytest.raises(ingest.FeedExists):
        _add(app, str(RSS_FIXTURE))


def test_a_broken_feed_is_recorded_and_the_others_go_on(app: App, tmp_path: Path) -> None:
    html = tmp_path / "page.xml"
    html.write_text("<!DOCTYPE html><html><body><p>Not a feed</p></body></html>")
    gone = tmp_path / "gone.xml"
    gone.write_bytes(RSS)
    bad, good, missing = _add(app, str(html)), _add(app, str(RSS_FIXTURE)), _add(app, str(gone))
    gone.unlink()
    reports = {r.feed_id: r for r in ingest.fetch_all(app)}
    assert not reports[bad].ok and reports[bad].message
    assert not reports[missing].ok
    assert reports[good].ok and reports[good].new_entries == 44
    with app.session() as session:
        feed = session.get(Feed, bad)
        assert feed is not None and feed.last_error and feed.consecutive_failures == 1
        assert feed.next_fetch_at is not None, "a failing feed backs off"
        assert ingest.due_feeds(session, ingest.utcnow()) == [good]


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}
    hits: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        self.hits.append((self.path, self.headers.get("If-None-Match")))
        status, headers, body = self.routes[self.path]
        if self.headers.get("If-None-Match") and self.headers["If-None-Match"] == headers.get(
            "ETag"
        ):
            status, body = 304, b""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.routes = {
        "/feed.xml": (200, {"ETag": '"v1"', "Content-Type": "application/rss+xml"}, RSS),
        "/old.xml": (301, {"Location": f"{base}/feed.xml"}, b""),
        "/gone.xml": (410, {}, b""),
    }
    _Handler.hits = []
    yield base
    httpd.shutdown()


def test_http_conditional_get_redirect_and_gone(app: App, server: str) -> None:
    moved, gone = _add(app, f"{server}/old.xml"), _add(app, f"{server}/gone.xml")
    first = {r.feed_id: r for r in ingest.fetch_all(app)}
    assert first[moved].new_entries == 44
    assert not first[gone].ok and "410" in first[gone].message
    with app.session() as session:
        moved_feed, gone_feed = session.get(Feed, moved), session.get(Feed, gone)
        assert moved_feed is not None and moved_feed.url == f"{server}/feed.xml"
        assert moved_feed.etag == '"v1"'
        assert gone_feed is not None and not gone_feed.enabled
    second = {r.feed_id: r for r in ingest.fetch_all(app)}
    assert set(second) == {moved}, "a gone feed is not fetched again"
    assert second[moved].message == "not modified"
    assert ("/feed.xml", '"v1"') in _Handler.hits, "the stored ETag is sent back"
