"""Get a feed's bytes from an http(s) URL or a local file, defensively.

Feed servers are strangers: they may be slow, huge, redirect in circles or trickle a byte a
second. Every fetch therefore has a byte cap and one overall deadline, and redirects are
followed here (not by httpx) so that only a *permanent* redirect changes the stored URL.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import socket
import stat as stat_module
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit
from urllib.request import url2pathname

import httpx

__all__ = ["MAX_REDIRECTS", "FetchError", "FetchResult", "fetch"]

MAX_REDIRECTS = 5
DEFAULT_USER_AGENT = "newsletter/0.1 (+https://github.com/newsletter)"
_ACCEPT = (
    "application/rss+xml, application/atom+xml, application/rdf+xml;q=0.9, "
    "application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5"
)
_PERMANENT = frozenset({301, 308})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True, slots=True)
class FetchResult:
    status: Literal["ok", "not_modified", "gone"]
    body: bytes | None
    content_type: str | None
    etag: str | None
    last_modified: str | None
    url: str


class FetchError(Exception):
    """The feed could not be fetched; str() is a one-line reason fit for an admin's log."""


def fetch(
    source: str,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    timeout: float = 20.0,
    max_bytes: int = 10 * 1024 * 1024,
    client: httpx.Client | None = None,
    user_agent: str = DEFAULT_USER_AGENT,
) -> FetchResult:
    """Fetch `source` (http(s) URL, file:// URL or local path).

    `timeout` bounds the whole fetch, redirects and body included, not just each network
    operation. `client` lets callers share connection pools; redirects are never delegated to it.
    """
    if not source.strip():
        raise FetchError("no feed URL or path given")
    try:
        parts = urlsplit(source)
        host = parts.hostname
    except ValueError as exc:  # e.g. "http://[::1"
        raise FetchError(f"invalid URL {source!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not host:
            raise FetchError(f"invalid URL {source!r}: no host name")
        return _fetch_http(
            source,
            etag=etag,
            last_modified=last_modified,
            timeout=timeout,
            max_bytes=max_bytes,
            client=client,
            user_agent=user_agent,
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise FetchError(f"file URLs with a host are not supported: {source}")
        return _read_file(source, Path(url2pathname(parts.path)), max_bytes)
    if not scheme or (os.name == "nt" and len(scheme) == 1):  # Windows drive letter "C:\\"
        return _read_file(source, Path(source), max_bytes)
    raise FetchError(f"unsupported URL scheme {scheme!r}: use an http(s) URL or a local file path")


def _read_file(source: str, path: Path, max_bytes: int) -> FetchResult:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FetchError(f"no such file: {path}") from None
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat_module.S_ISREG(stat.st_mode):
        raise FetchError(f"not a file: {path}")
    if stat.st_size > max_bytes:
        raise FetchError(f"file larger than {_size(max_bytes)} limit: {path}")
    try:
        with path.open("rb") as fh:
            body = fh.read(max_bytes + 1)  # the file may have grown since stat()
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(body) > max_bytes:
        raise FetchError(f"file larger than {_size(max_bytes)} limit: {path}")
    return FetchResult(
        status="ok",
        body=body,
        content_type=None,  # let the parser sniff; a file extension says little
        etag=None,
        last_modified=email.utils.formatdate(stat.st_mtime, usegmt=True),
        url=source,
    )


# Sockets that fetches opened through each caller-supplied client. When such a client hands a
# request an idle keep-alive connection, no trace event reveals that connection's socket before
# the response headers arrive; if the deadline strikes in that window, the client's known sockets
# are shut down instead. Idle ones are then merely dropped by the pool; the cost is that another
# thread's request in flight on the same client could fail too.
_CLIENT_SOCKETS: weakref.WeakKeyDictionary[httpx.Client, weakref.WeakSet[socket.socket]] = (
    weakref.WeakKeyDictionary()
)
_CLIENT_SOCKETS_LOCK = threading.Lock()


class _Deadline:
    """Enforces one wall-clock limit on a sequence of httpx requests.

    httpx only has per-operation timeouts, so a server sending one byte per second never trips
    them. A timer thread shuts down the sockets at the deadline, which wakes any blocked read
    (headers or body) with an error. Sockets are learned from httpcore's trace extension (new
    connections) and from the response's network stream (reused ones, once headers arrived).
    """

    def __init__(self, seconds: float, shared_client: httpx.Client | None) -> None:
        self.seconds = seconds
        self.expires_at = time.monotonic() + seconds
        self.expired = False
        self._shared_client = shared_client
        self._sockets: list[socket.socket] = []
        self._hop_socket_known = False
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._done = True  # never shut down a socket that went back to a shared pool
        self._timer.cancel()

    def remaining(self) -> float:
        left = self.expires_at - time.monotonic()
        if left <= 0 or self.expired:
            self.expired = True
            raise FetchError(f"timed out after {self.seconds:g}s")
        return left

    def start_hop(self) -> None:
        with self._lock:
            self._hop_socket_known = False

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            sock = self.watch(info.get("return_value"))
            if sock is not None and self._shared_client is not None:
                with _CLIENT_SOCKETS_LOCK:
                    known = _CLIENT_SOCKETS.setdefault(self._shared_client, weakref.WeakSet())
                    known.add(sock)

    def watch(self, stream: Any) -> socket.socket | None:
        get_extra_info = getattr(stream, "get_extra_info", None)
        sock = get_extra_info("socket") if callable(get_extra_info) else None
        if not isinstance(sock, socket.socket):
            return None
        with self._lock:
            self._sockets.append(sock)
            self._hop_socket_known = True
        return sock

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            targets = list(self._sockets)
            if not self._hop_socket_known and self._shared_client is not None:
                with _CLIENT_SOCKETS_LOCK:
                    targets.extend(_CLIENT_SOCKETS.get(self._shared_client, ()))
            for sock in targets:
                # The base-class method: SSLSocket.shutdown would also tear down its TLS state
                # under the reading thread's feet.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _fetch_http(
    url: str,
    *,
    etag: str | None,
    last_modified: str | None,
    timeout: float,
    max_bytes: int,
    client: httpx.Client | None,
    user_agent: str,
) -> FetchResult:
    headers = {"User-Agent": user_agent, "Accept": _ACCEPT}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    own_client = client is None
    http = client if client is not None else httpx.Client(follow_redirects=False)
    deadline = _Deadline(timeout, client)
    try:
        with deadline:
            return _follow(http, url, headers, deadline, max_bytes, etag, last_modified)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise _translate(exc, deadline) from exc
    finally:
        if own_client:
            http.close()


def _follow(
    http: httpx.Client,
    url: str,
    headers: dict[str, str],
    deadline: _Deadline,
    max_bytes: int,
    etag: str | None,
    last_modified: str | None,
) -> FetchResult:
    stored_url = url  # moves only while every hop so far was permanent
    current = httpx.URL(url)
    seen = {str(current)}
    all_permanent = True
    for _hop in range(MAX_REDIRECTS + 1):
        deadline.start_hop()
        request = http.build_request(
            "GET",
            current,
            headers=headers,
            timeout=deadline.remaining(),
            extensions={"trace": deadline.trace},
        )
        response = http.send(request, stream=True, follow_redirects=False)
        try:
            deadline.watch(response.extensions.get("network_stream"))
            status = response.status_code
            if status in _REDIRECTS and "location" in response.headers:
                current = _redirect_target(response)
                if str(current) in seen:
                    raise FetchError(f"redirect loop at {current}")
                seen.add(str(current))
                all_permanent = all_permanent and status in _PERMANENT
                if all_permanent:
                    stored_url = str(current)
                continue
            if status == 304:
                return FetchResult(
                    status="not_modified",
                    body=None,
                    content_type=None,
                    etag=response.headers.get("etag") or etag,
                    last_modified=response.headers.get("last-modified") or last_modified,
                    url=stored_url,
                )
            if status == 410:
                return FetchResult("gone", None, None, None, None, stored_url)
            if not 200 <= status < 300:
                reason = f" {response.reason_phrase}" if response.reason_phrase else ""
                raise FetchError(f"HTTP {status}{reason}")
            body = _read_capped(response, max_bytes, deadline)
            return FetchResult(
                status="ok",
                body=body,
                content_type=response.headers.get("content-type"),
                etag=response.headers.get("etag"),
                last_modified=response.headers.get("last-modified"),
                url=stored_url,
            )
        finally:
            response.close()
    raise FetchError(f"too many redirects (more than {MAX_REDIRECTS})")


def _redirect_target(response: httpx.Response) -> httpx.URL:
    location = response.headers["location"]
    try:
        target = response.url.join(location)
    except httpx.InvalidURL as exc:
        raise FetchError(f"redirect to an invalid URL {location!r}: {exc}") from None
    if target.scheme not in ("http", "https"):
        raise FetchError(f"redirect to a non-http(s) URL: {location}")
    return target


def _read_capped(response: httpx.Response, max_bytes: int, deadline: _Deadline) -> bytes:
    limit = f"response larger than {_size(max_bytes)} limit"
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(limit)
    chunks: list[bytes] = []
    total = 0
    # Decoded bytes are counted, so a gzip bomb stops at the cap too (a single network read
    # can still inflate to ~1000x its size before the check).
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise FetchError(limit)
        chunks.append(chunk)
        deadline.remaining()
    # A body delimited by connection close looks complete when the deadline shut the socket.
    deadline.remaining()
    return b"".join(chunks)


def _translate(exc: httpx.HTTPError | httpx.InvalidURL, deadline: _Deadline) -> FetchError:
    if deadline.expired or isinstance(exc, httpx.TimeoutException):
        return FetchError(f"timed out after {deadline.seconds:g}s")
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        try:
            where = f" to {exc.request.url.host}"
        except RuntimeError:  # httpx raises when the exception carries no request
            where = ""
        return FetchError(f"could not connect{where}: {detail}")
    if isinstance(exc, httpx.DecodingError):
        return FetchError(f"could not decode the response body: {detail}")
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return FetchError(f"invalid URL: {detail}")
    return FetchError(f"HTTP request failed: {detail}")


def _size(n: int) -> str:
    mib, kib = 1024 * 1024, 1024
    if n >= mib and n % mib == 0:
        return f"{n // mib} MB"
    if n >= kib and n % kib == 0:
        return f"{n // kib} KB"
    return f"{n} bytes"
