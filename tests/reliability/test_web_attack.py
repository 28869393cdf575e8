"""The web app under attack: thousands of random and malicious inputs at every form and token
endpoint (hypothesis), and a bounded burst of real HTTP requests on loopback.

Invariants checked on every response: no 5xx, no injected text in any response header, no
reflected markup (the hostile marker never comes back unescaped), and tokens that were never
issued are refused."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_web_support import Site, free_port, open_site, running_server

from newsletter.sink import Sink
from newsletter.tokens import Purpose

MARK = "<script>x9</script>"
HOSTILE = st.one_of(
    st.text(max_size=300),
    st.sampled_from(
        [
            MARK,
            f'"><img src=x onerror=alert(1)>{MARK}',
            "a@example.org\r\nBcc: victim@example.org",
            "diffusion\r\nSet-Cookie: x=1",
            "\x00\x01\x7f",
            "ﬁ" * 200,
            "../../etc/passwd",
            "' OR 1=1 --",
            "a" * 5000,
            "{{ 7*7 }}",
            "\u202e\u200b",
        ]
    ),
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "email": HOSTILE,
        "keywords": HOSTILE,
        "exclude": HOSTILE,
        "timezone": HOSTILE,
        "send_hour": HOSTILE,
        "max_items": HOSTILE,
        "frequency": HOSTILE,
        "action": st.sampled_from(["subscribe", "preview", "save", "x"]),
    },
)
FAST = {
    "rate_limit_per_client": "1000000/minute",
    "rate_limit_per_address": "1000000/hour",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    db = tmp_path_factory.mktemp("attack") / "n.db"
    with (
        Sink(db.parent / "sink", "127.0.0.1", 0) as sink,
        open_site(f"sqlite:///{db}", sink, papers=True, **FAST) as s,
    ):
        s.add("known@example.org", ["diffusion models"])
        yield s


def _check(response: Any, where: str) -> None:
    assert response.status_code < 500, f"{where}: {response.status_code}"
    for name, value in response.headers.items():
        assert "\n" not in value and "\r" not in value, (where, name)
        assert "victim@example.org" not in value and "x=1" not in value, (where, name, value)
    assert MARK not in response.text, f"{where}: reflected markup"
    assert "onerror=alert" not in response.text.replace("onerror=alert(1)&gt;", ""), where


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(fields=FIELDS, path=st.sampled_from(["/", "/link", "/preview"]))
def test_random_forms(site: Site, fields: dict[str, str], path: str) -> None:
    data = {k: v for k, v in fields.items()}
    response = site.post(path, data)
    _check(response, f"POST {path}")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(token=HOSTILE, kind=st.sampled_from(["confirm", "manage", "unsubscribe"]), fields=FIELDS)
def test_forged_tokens_are_refused(
    site: Site, token: str, kind: str, fields: dict[str, str]
) -> None:
    path = f"/{kind}/{quote(token, safe='') or 'x'}"
    got = site.client.get(path)
    _check(got, f"GET {kind}")
    assert got.status_code in (400, 404, 405), f"GET {path}: {got.status_code}"
    posted = site.client.post(path, data={"List-Unsubscribe": "One-Click", **fields})
    _check(posted, f"POST {kind}")
    assert posted.status_code in (400, 403, 404, 405), f"POST {path}: {posted.status_code}"


def test_valid_tokens_still_work(site: Site) -> None:
    """The negative tests above must not pass because everything is refused."""
    sub = site.subscriber("known@example.org")
    assert sub is not None
    page = site.client.get(f"/manage/{site.token(Purpose.MANAGE, sub)}")
    assert page.status_code == 200 and "known@example.org" in page.text


def test_burst_on_loopback(sqlite_url: str, sink: Sink, figures: Any) -> None:
    """8 clients, at most 2,000 requests or 15 seconds, against a real uvicorn: the subscribe
    and manage pages keep answering, and rate limits answer 429 rather than falling over."""
    with open_site(sqlite_url, sink, papers=True) as site:
        site.add("reader@example.org", ["diffusion models"])
        sub = site.subscriber("reader@example.org")
        assert sub is not None
        manage = f"/manage/{site.token(Purpose.MANAGE, sub)}"
        with running_server(site.web, free_port()) as base:
            latencies: list[float] = []
            statuses: dict[int, int] = {}
            lock = threading.Lock()
            deadline = time.monotonic() + 15
            budget = iter(range(2000))

            def client(n: int) -> None:
                with httpx.Client(base_url=base, timeout=10) as http:
                    while time.monotonic() < deadline:
                        try:
                            i = next(budget)
                        except StopIteration:
                            return
                        t0 = time.perf_counter()
                        if i % 3 == 0:
                            r = http.get(manage)
                        elif i % 3 == 1:
                            r = http.get("/")
                        else:  # a form post without a session: refused cheaply, never a 5xx
                            r = http.post("/", data={"email": f"x{i}@example.org"})
                        elapsed = time.perf_counter() - t0
                        with lock:
                            latencies.append(elapsed)
                            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    rps = len(latencies) / wall
    figures.add("requests", len(latencies), f"8 clients, {wall:.1f}s")
    figures.add("requests/s", round(rps), "manage page, subscribe page, form posts")
    figures.add(
        "p99 ms", round(p99 * 1000, 1), f"median {statistics.median(latencies) * 1000:.1f} ms"
    )
    figures.add("statuses", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    print(f"burst: {len(latencies)} requests, {rps:.0f}/s, p99 {p99 * 1000:.1f} ms, {statuses}")
    assert not any(code >= 500 for code in statuses), statuses
    assert statuses.get(200, 0) >= len(latencies) * 0.6, "the pages kept answering"
