"""Shared set-up for the web tests (no tests here): the real app over a real database, with the
real SMTP sink catching what it sends, driven over HTTP by Starlette's TestClient.

TestClient runs background tasks before it returns a response, so an email the app sends
"after the response" is already in the sink when a test looks."""

from __future__ import annotations

import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from conftest import RSS_FIXTURE, make_settings
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

from newsletter import db, ingest, subscribers
from newsletter.app import App
from newsletter.models import Subscriber, SubscriberStatus
from newsletter.sink import Sink, SinkMessage
from newsletter.tokens import Purpose, Signer
from newsletter.web import create_app

with warnings.catch_warnings():
    # Starlette would rather have `httpx2`; plain httpx works the same for these tests.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

BASE = "https://testserver"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Site:
    app: App
    web: Starlette
    client: TestClient
    sink: Sink

    def csrf(self, path: str = "/") -> str:
        """A fresh form token, as a browser gets it: by loading a page with a form."""
        page = self.client.get(path)
        found = CSRF_RE.search(page.text)
        assert found, f"no CSRF field on {path}: {page.status_code}"
        return found.group(1)

    def post(self, path: str, data: dict[str, str], *, token_from: str | None = "/") -> Any:
        form = dict(data)
        if token_from is not None:
            form["csrf_token"] = self.csrf(token_from)
        return self.client.post(path, data=form, follow_redirects=False)

    def subscribe(self, email: str, keywords: str = "diffusion models", **extra: str) -> Any:
        return self.post("/", {"email": email, "keywords": keywords, **extra})

    def mails(self, to: str | None = None) -> list[SinkMessage]:
        return [m for m in self.sink.messages() if to is None or to in m.rcpt_tos]

    def subscriber(self, email: str) -> Subscriber | None:
        with self.app.session() as session:
            return session.scalar(select(Subscriber).where(Subscriber.email == email))

    def add(
        self,
        email: str,
        keywords: list[str],
        status: SubscriberStatus = SubscriberStatus.ACTIVE,
        **profile: Any,
    ) -> Subscriber:
        spec = subscribers.ProfileSpec.from_mapping(
            {"email": email, "keywords": keywords, **profile}
        )
        with db.transaction(self.app.sessions) as session:
            sub, _ = subscribers.upsert(session, spec, status=status)
        return sub

    def token(self, purpose: Purpose, sub: Subscriber) -> str:
        return Signer(self.app.secret_key).make(purpose, sub.id, sub.email)


def page(text: str, *replace: str) -> str:
    """A page's text without what legitimately differs per request (the CSP nonce) and with
    the given strings (say, the address typed) blanked, for comparing two answers."""
    text = re.sub(r'nonce="[^"]*"', 'nonce=""', text)
    for item in replace:
        text = text.replace(item, "…")
    return text


def text_of(message: SinkMessage) -> str:
    part = message.message.get_body(preferencelist=("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


def link_path(message: SinkMessage, kind: str) -> str:
    """The path of the first /<kind>/<token> link in a message's text part."""
    found = re.search(rf"https?://[^/\s]+(/{kind}/[A-Za-z0-9_.\-]+)", text_of(message))
    assert found, f"no /{kind}/ link in {message.subject!r}"
    return found.group(1)


def ingest_fixture_feed(app: App) -> None:
    with db.transaction(app.sessions) as session:
        ingest.add_feed(session, str(RSS_FIXTURE))
    ingest.fetch_all(app)


@contextmanager
def open_site(
    db_url: str,
    sink: Sink,
    *,
    papers: bool = False,
    sink_dir: Path | None = None,
    **overrides: Any,
) -> Iterator[Site]:
    app = App(make_settings(db_url, sink.port, **overrides))
    app.init()
    if papers:
        ingest_fixture_feed(app)
    web = create_app(app, sink_dir=sink_dir)
    try:
        with TestClient(web, base_url=BASE) as client:
            yield Site(app, web, client, sink)
    finally:
        app.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(web: Starlette, port: int) -> Iterator[str]:
    """A real uvicorn on a free port in a thread, for clients that need real HTTP."""
    config = uvicorn.Config(web, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
