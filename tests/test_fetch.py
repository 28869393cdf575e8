"""fetch() against a real HTTP server on 127.0.0.1 and real files; nothing is mocked."""

from __future__ import annotations

import gzip
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from newsletter.fetch import FetchError, fetch

DATA = Path(__file__).parent / "data"
RSS = (DATA / "daily-papers.rss.xml").read_bytes()
FAST = 1.5  # seconds; every test passes a short timeout so a regression can't hang the suite
DEADLINE = 0.5  # for the tests that wait for the overall deadline to strike

Route = Callable[["Handler"], None]


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, Route] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.ports: list[int] = []  # client ports, to tell reused connections from new ones
        self.stop = threading.Event()
        self.bytes_sent = 0

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up are expected
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def do_GET(self) -> None:
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        self.server.ports.append(self.client_address[1])
        route = self.server.routes.get(self.path)
        if route is None:
            self.reply(404, b"no such route")
            return
        try:
            route(self)
        except ConnectionError:  # the client gave up, which is what several tests want
            self.close_connection = True

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def _server() -> Iterator[Server]:
    server = Server()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(_server: Server) -> Server:
    _server.routes.clear()
    _server.seen.clear()
    _server.ports.clear()
    _server.bytes_sent = 0
    return _server


def feed_route(body: bytes = RSS, headers: dict[str, str] | None = None) -> Route:
    def route(h: Handler) -> None:
        h.reply(200, body, {"Content-Type": "application/rss+xml", **(headers or {})})

    return route


def redirect(status: int, location: str) -> Route:
    return lambda h: h.reply(status, b"", {"Location": location})


# --- http ------------------------------------------------------------------------------------


def test_ok_returns_body_validators_and_sends_user_agent(server: Server) -> None:
    server.routes["/feed"] = feed_route(
        headers={"ETag": '"v1"', "Last-Modified": "Wed, 13 Nov 2024"}
    )
    result = fetch(server.url("/feed"), timeout=FAST, user_agent="test-agent/1")
    assert result.status == "ok"
    assert result.body == RSS
    assert result.content_type == "application/rss+xml"
    assert result.etag == '"v1"'
    assert result.last_modified == "Wed, 13 Nov 2024"
    assert result.url == server.url("/feed")
    headers = server.seen[0][1]
    assert headers["user-agent"] == "test-agent/1"
    assert "if-none-match" not in headers


def test_conditional_get_returns_not_modified(server: Server) -> None:
    lm = "Wed, 13 Nov 2024 05:00:00 GMT"

    def route(h: Handler) -> None:
        if h.headers.get("If-None-Match") == '"v1"':
            h.reply(304, b"", {"ETag": '"v1"'})
        else:
            h.reply(200, RSS, {"ETag": '"v1"', "Last-Modified": lm})

    server.routes["/feed"] = route
    first = fetch(server.url("/feed"), timeout=FAST)
    assert first.status == "ok"
    second = fetch(server.url("/feed"), etag=first.etag, last_modified=first.last_modified)
    assert second.status == "not_modified"
    assert second.body is None
    assert second.etag == '"v1"'
    assert second.last_modified == lm  # kept from the request when the 304 doesn't repeat it
    assert server.seen[1][1]["if-none-match"] == '"v1"'
    assert server.seen[1][1]["if-modified-since"] == lm


def test_gzip_body_is_decoded(server: Server) -> None:
    server.routes["/gz"] = feed_route(gzip.compress(RSS), {"Content-Encoding": "gzip"})
    result = fetch(server.url("/gz"), timeout=FAST)
    assert result.body == RSS


def test_gzip_bomb_is_capped_on_decoded_size(server: Server) -> None:
    bomb = gzip.compress(b"\0" * (8 * 1024 * 1024))  # ~8 KB on the wire
    server.routes["/bomb"] = feed_route(bomb, {"Content-Encoding": "gzip"})
    with pytest.raises(FetchError, match="response larger than 1 MB limit"):
        fetch(server.url("/bomb"), max_bytes=1024 * 1024, timeout=FAST)


@pytest.mark.parametrize("status", [301, 308])
def test_permanent_redirect_updates_url(server: Server, status: int) -> None:
    server.routes["/old"] = redirect(status, "/new")
    server.routes["/new"] = feed_route()
    result = fetch(server.url("/old"), timeout=FAST)
    assert result.status == "ok"
    assert result.body == RSS
    assert result.url == server.url("/new")


@pytest.mark.parametrize("status", [302, 303, 307])
def test_temporary_redirect_keeps_url(server: Server, status: int) -> None:
    server.routes["/old"] = redirect(status, server.url("/elsewhere"))
    server.routes["/elsewhere"] = feed_route()
    result = fetch(server.url("/old"), timeout=FAST)
    assert result.body == RSS
    assert result.url == server.url("/old")


def test_only_the_permanent_prefix_of_a_redirect_chain_is_stored(server: Server) -> None:
    server.routes["/a"] = redirect(301, "/b")
    server.routes["/b"] = redirect(302, "/c")
    server.routes["/c"] = redirect(301, "/d")
    server.routes["/d"] = feed_route()
    assert fetch(server.url("/a"), timeout=FAST).url == server.url("/b")
    assert fetch(server.url("/b"), timeout=FAST).url == server.url("/b")


def test_redirect_loop_is_an_error(server: Server) -> None:
    server.routes["/a"] = redirect(302, "/b")
    server.routes["/b"] = redirect(301, "/a")
    with pytest.raises(FetchError, match="redirect loop"):
        fetch(server.url("/a"), timeout=FAST)
    assert len(server.seen) == 2


def test_too_many_redirects(server: Server) -> None:
    for i in range(8):
        server.routes[f"/r{i}"] = redirect(302, f"/r{i + 1}")
    with pytest.raises(FetchError, match=r"too many redirects \(more than 5\)"):
        fetch(server.url("/r0"), timeout=FAST)
    assert len(server.seen) == 6


def test_redirect_to_another_scheme_is_refused(server: Server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.xml"
    secret.write_bytes(RSS)
    server.routes["/evil"] = redirect(302, secret.as_uri())
    with pytest.raises(FetchError, match="non-http"):
        fetch(server.url("/evil"), timeout=FAST)


def test_410_means_gone(server: Server) -> None:
    server.routes["/gone"] = lambda h: h.reply(410, b"bye")
    result = fetch(server.url("/gone"), timeout=FAST)
    assert result.status == "gone"
    assert result.body is None


@pytest.mark.parametrize(
    ("status", "message"), [(404, "HTTP 404 Not Found"), (503, "HTTP 503 Service Unavailable")]
)
def test_http_errors_raise(server: Server, status: int, message: str) -> None:
    server.routes["/x"] = lambda h: h.reply(status, b"nope")
    with pytest.raises(FetchError) as info:
        fetch(server.url("/x"), timeout=FAST)
    assert str(info.value) == message


def test_oversized_streamed_body_is_cut_off_early(server: Server) -> None:
    def huge(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/rss+xml")
        h.send_header("Connection", "close")  # no Content-Length: the client must count
        h.end_headers()
        chunk = b"x" * 65536
        while h.server.bytes_sent < 50 * 1024 * 1024 and not h.server.stop.is_set():
            h.wfile.write(chunk)
            h.server.bytes_sent += len(chunk)

    server.routes["/huge"] = huge
    started = time.monotonic()
    with pytest.raises(FetchError, match="response larger than 1 MB limit"):
        fetch(server.url("/huge"), max_bytes=1024 * 1024, timeout=5)
    assert time.monotonic() - started < 2
    time.sleep(0.1)  # let the server notice the closed connection
    assert server.bytes_sent < 20 * 1024 * 1024  # socket buffers absorb a few MB, not 50


def test_declared_oversized_body_is_refused_before_reading(server: Server) -> None:
    def liar(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(50 * 1024 * 1024))
        h.end_headers()
        h.wfile.write(b"<rss>")
        h.server.stop.wait(3)

    server.routes["/liar"] = liar
    started = time.monotonic()
    with pytest.raises(FetchError, match="larger than 10 MB limit"):
        fetch(server.url("/liar"), timeout=FAST)
    assert time.monotonic() - started < 1


def _trickle(h: Handler, data: bytes) -> None:
    for byte in data:
        if h.server.stop.wait(0.05):
            return
        h.wfile.write(bytes([byte]))
        h.wfile.flush()


@pytest.mark.parametrize(
    "framing",
    [("Content-Length", "100000"), ("Connection", "close")],  # close: EOF must not look complete
)
def test_body_trickling_forever_fails_at_the_deadline(
    server: Server, framing: tuple[str, str]
) -> None:
    def slow_body(h: Handler) -> None:
        h.send_response(200)
        h.send_header(*framing)
        h.end_headers()
        h.wfile.flush()
        _trickle(h, b"<" * 100000)

    server.routes["/slow"] = slow_body
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"timed out after 0\.5s"):
        fetch(server.url("/slow"), timeout=DEADLINE)
    assert DEADLINE - 0.05 < time.monotonic() - started < DEADLINE + 0.4


def test_headers_trickling_forever_fail_at_the_deadline(server: Server) -> None:
    def slow_headers(h: Handler) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        _trickle(h, b"X-Slow: " + b"a" * 100000)

    server.routes["/slow-headers"] = slow_headers
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"timed out after 0\.5s"):
        fetch(server.url("/slow-headers"), timeout=DEADLINE)
    assert DEADLINE - 0.05 < time.monotonic() - started < DEADLINE + 0.4


def test_headers_trickling_on_a_reused_connection_fail_at_the_deadline(server: Server) -> None:
    def slow_headers(h: Handler) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        _trickle(h, b"X-Slow: " + b"a" * 100000)

    server.routes["/feed"] = feed_route()
    server.routes["/slow-headers"] = slow_headers
    with httpx.Client() as client:
        assert fetch(server.url("/feed"), client=client, timeout=FAST).status == "ok"
        started = time.monotonic()
        with pytest.raises(FetchError, match=r"timed out after 0\.5s"):
            fetch(server.url("/slow-headers"), client=client, timeout=DEADLINE)
        assert DEADLINE - 0.05 < time.monotonic() - started < DEADLINE + 0.4
        # The client stays usable: the pool replaces the connection that was shut down.
        assert fetch(server.url("/feed"), client=client, timeout=FAST).body == RSS
    assert server.ports[0] == server.ports[1]  # the slow request really reused the connection


def test_silent_server_times_out(server: Server) -> None:
    def silent(h: Handler) -> None:
        h.server.stop.wait(3)

    server.routes["/silent"] = silent
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"timed out after 0\.5s"):
        fetch(server.url("/silent"), timeout=0.5)
    assert time.monotonic() - started < 1


def test_connection_refused() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as unused:
        port = unused.server_address[1]
    with pytest.raises(FetchError, match=r"could not connect to 127\.0\.0\.1: .*refused"):
        fetch(f"http://127.0.0.1:{port}/feed", timeout=FAST)


def test_shared_client_is_used_but_never_follows_redirects_itself(server: Server) -> None:
    server.routes["/tmp"] = redirect(302, "/feed")
    server.routes["/feed"] = feed_route()
    with httpx.Client(follow_redirects=True) as client:
        for _ in range(2):  # the second round reuses the pooled connection
            result = fetch(server.url("/tmp"), client=client, timeout=FAST)
            assert result.body == RSS
            assert result.url == server.url("/tmp")
        assert not client.is_closed


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("http://", "no host name"),
        ("https://[::1/feed", "invalid URL"),
        ("", "no feed URL or path given"),
    ],
)
def test_malformed_sources_are_errors(source: str, message: str) -> None:
    with pytest.raises(FetchError, match=re.escape(message)):
        fetch(source, timeout=FAST)


@pytest.mark.parametrize("source", ["ftp://example.org/feed.xml", "gopher://x/y", "javascript:x"])
def test_other_schemes_are_refused(source: str) -> None:
    with pytest.raises(FetchError, match="unsupported URL scheme"):
        fetch(source)


# --- https: the deadline must also cut through TLS ---------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, ssl.SSLContext]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a throwaway certificate")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server = Server()
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server, ssl.create_default_context(cafile=str(cert))
    server.stop.set()
    server.shutdown()
    server.server_close()


def test_https_fetch_and_trickle_deadline(tls: tuple[Server, ssl.SSLContext]) -> None:
    server, client_ctx = tls
    server.routes["/feed"] = feed_route()

    def slow_body(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        h.wfile.flush()
        _trickle(h, b"<" * 100000)

    server.routes["/slow"] = slow_body
    https = server.url("/feed").replace("http://", "https://")
    with httpx.Client(verify=client_ctx) as client:
        assert fetch(https, client=client, timeout=FAST).body == RSS
        started = time.monotonic()
        with pytest.raises(FetchError, match=r"timed out after 0\.5s"):
            fetch(https.replace("/feed", "/slow"), client=client, timeout=DEADLINE)
        assert DEADLINE - 0.05 < time.monotonic() - started < DEADLINE + 0.4


# --- local files -----------------------------------------------------------------------------


def test_local_file_by_absolute_path_relative_path_and_file_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "my feed.xml"
    path.write_bytes(RSS)
    monkeypatch.chdir(tmp_path)
    for source in (str(path), "my feed.xml", path.as_uri()):
        result = fetch(source)
        assert result.status == "ok"
        assert result.body == RSS
        assert result.url == source
        assert result.last_modified and result.last_modified.endswith("GMT")


def test_missing_file_and_directory_are_errors(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"no such file: .*nope\.xml"):
        fetch(str(tmp_path / "nope.xml"))
    with pytest.raises(FetchError, match=re.escape(f"not a file: {tmp_path}")):
        fetch(str(tmp_path))


def test_file_over_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.xml"
    path.write_bytes(b" " * 2048)
    with pytest.raises(FetchError, match="file larger than 1 KB limit"):
        fetch(str(path), max_bytes=1024)
    assert fetch(str(path), max_bytes=2048).body == b" " * 2048
