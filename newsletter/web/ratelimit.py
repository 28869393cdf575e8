"""Rate limits on the forms that make us send email, per client and per address.

In-memory (the `limits` library's moving window): one web process guards itself with no extra
service to run. Several processes behind a balancer would each allow the full rate; the
per-address cooldown stored on the subscriber row (`link_sent_at`) still holds across them, so
no address can be mail-bombed either way.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.requests import Request

# The live preview fires as people type (debounced); generous, but bounded, since each one
# matches against every recent paper.
PREVIEW_RATE = "120/minute"


@dataclass(frozen=True, slots=True)
class Limited:
    """The request went over a limit: when to come back, and which limit it was."""

    retry_after: int
    scope: str


class RateLimits:
    def __init__(self, per_client: str, per_address: str, preview: str = PREVIEW_RATE) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self.per_client: RateLimitItem = parse(per_client)
        self.per_address: RateLimitItem = parse(per_address)
        self.preview: RateLimitItem = parse(preview)

    def _hit(self, item: RateLimitItem, *key: str) -> Limited | None:
        if self._limiter.hit(item, *key):
            return None
        reset = self._limiter.get_window_stats(item, *key).reset_time
        return Limited(max(1, math.ceil(reset - time.time())), key[0])

    def client(self, request: Request, action: str) -> Limited | None:
        return self._hit(self.per_client, "client", action, client_key(request))

    def address(self, email: str, action: str) -> Limited | None:
        # The address, not the client: a botnet spread over many IPs still cannot flood one
        # inbox. Counted for known and unknown addresses alike, so a 429 reveals nothing.
        return self._hit(self.per_address, "address", action, email.lower())

    def preview_request(self, request: Request) -> Limited | None:
        return self._hit(self.preview, "preview", "any", client_key(request))


def client_key(request: Request) -> str:
    """The peer address as uvicorn reports it (behind a proxy: the X-Forwarded-For entry the
    proxy added, when the proxy is trusted with --forwarded-allow-ips)."""
    return request.client.host if request.client else "unknown"
