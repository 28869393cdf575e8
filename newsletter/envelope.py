"""Envelope senders with VERP (bounces+TOKEN@domain), so a bounce names the delivery it is
about without trusting anything else in the bounce message.

The token is the delivery id plus a short HMAC, so a forged bounce cannot suppress someone
else's address."""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from email.utils import parseaddr

from newsletter.config import Settings

VERP_LOCAL = "bounces"
_TOKEN = re.compile(r"^([0-9a-z]+)-([0-9a-f]{12})$")


@functools.lru_cache(maxsize=4)
def _key(secret_key: str) -> bytes:
    return hashlib.sha256(b"newsletter.verp:" + secret_key.encode()).digest()


def _mac(secret_key: str, delivery_id: int) -> str:
    return hmac.new(_key(secret_key), str(delivery_id).encode(), hashlib.sha256).hexdigest()[:12]


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def bounce_domain(settings: Settings) -> str:
    return settings.bounce_domain or _domain_of(settings.from_addr)


@functools.lru_cache(maxsize=16)
def _domain_of(address: str) -> str:
    # Once per setting, not per message: parsing an address was a tenth of sending one.
    return parseaddr(address)[1].rpartition("@")[2]


def verp_token(secret_key: str, delivery_id: int) -> str:
    return f"{_base36(delivery_id)}-{_mac(secret_key, delivery_id)}"


def envelope_sender(settings: Settings, secret_key: str, delivery_id: int) -> str:
    return f"{VERP_LOCAL}+{verp_token(secret_key, delivery_id)}@{bounce_domain(settings)}"


def parse_verp(secret_key: str, address: str) -> int | None:
    """The delivery id in a VERP address, or None when it is not ours or was tampered with."""
    local = address.strip().strip("<>").rpartition("@")[0].lower()
    prefix = VERP_LOCAL + "+"
    if not local.startswith(prefix):
        return None
    match = _TOKEN.match(local[len(prefix) :])
    if match is None:
        return None
    delivery_id = int(match.group(1), 36)
    if not hmac.compare_digest(match.group(2), _mac(secret_key, delivery_id)):
        return None
    return delivery_id
