"""Signed, purpose-bound link tokens (itsdangerous).

Each purpose has its own salt, so a confirm token cannot unsubscribe and a manage token cannot
confirm. A token names the subscriber id and a fingerprint of the address, so a token stays
tied to the person it was made for even if an id is reused after a deletion."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from itsdangerous import Signer as ItsSigner
from itsdangerous.encoding import base64_encode


class Purpose(StrEnum):
    CONFIRM = "confirm"
    MANAGE = "manage"
    UNSUBSCRIBE = "unsubscribe"


# How long a link keeps working. Unsubscribe links sit in old emails for months and must still
# work (and the law in many places says so); confirm links should die quickly.
MAX_AGE_SECONDS: dict[Purpose, int] = {
    Purpose.CONFIRM: 2 * 24 * 3600,
    Purpose.MANAGE: 180 * 24 * 3600,
    Purpose.UNSUBSCRIBE: 400 * 24 * 3600,
}


class InvalidToken(ValueError):
    """The token is forged, altered, expired or made for another purpose."""


@dataclass(frozen=True, slots=True)
class TokenData:
    subscriber_id: int
    email_fingerprint: str


def email_fingerprint(secret_key: str, email: str) -> str:
    digest = hmac.new(secret_key.encode(), email.lower().encode(), hashlib.sha256)
    return digest.hexdigest()[:16]


class _Serializer(URLSafeTimedSerializer):
    """itsdangerous's URL-safe timed tokens, made without trying zlib first. Our payload (an
    id and 16 hex digits) never compresses, and the attempt was half the cost of a token, of
    which every digest carries two. Reading is unchanged, so tokens made either way work."""

    def dump_payload(self, obj: Any) -> bytes:
        return base64_encode(self.serializer.dumps(obj, **self.serializer_kwargs))

    def make_signer(self, salt: str | bytes | None = None) -> ItsSigner:
        # One signer per salt, not one per token: it holds nothing that changes per call
        # (the timestamp is read when signing).
        signers: dict[str | bytes | None, ItsSigner] = self.__dict__.setdefault("_signers", {})
        found = signers.get(salt)
        if found is None:
            found = signers[salt] = super().make_signer(salt)
        return found


class Signer:
    def __init__(self, secret_key: str) -> None:
        self._secret = secret_key
        # SHA-1 is itsdangerous's default too, but behind a Python function, which sends
        # `hmac` down its pure-Python path; hashlib's own constructor gets OpenSSL's HMAC.
        self._serializers = {
            purpose: _Serializer(
                secret_key,
                salt=f"newsletter.{purpose.value}",
                signer_kwargs={"digest_method": hashlib.sha1},
            )
            for purpose in Purpose
        }

    def make(self, purpose: Purpose, subscriber_id: int, email: str) -> str:
        return self.make_all((purpose,), subscriber_id, email)[0]

    def make_all(self, purposes: Sequence[Purpose], subscriber_id: int, email: str) -> list[str]:
        """Several links for one person (a digest carries two): the fingerprint once."""
        payload = [subscriber_id, email_fingerprint(self._secret, email)]
        tokens = [self._serializers[purpose].dumps(payload) for purpose in purposes]
        assert all(isinstance(token, str) for token in tokens)
        return tokens

    def read(self, purpose: Purpose, token: str, *, max_age: int | None = None) -> TokenData:
        limit = MAX_AGE_SECONDS[purpose] if max_age is None else max_age
        try:
            payload = self._serializers[purpose].loads(token, max_age=limit)
        except SignatureExpired:
            raise InvalidToken(f"this {purpose.value} link has expired") from None
        except BadSignature:
            raise InvalidToken(f"this {purpose.value} link is not valid") from None
        if (
            not isinstance(payload, list)
            or len(payload) != 2
            or not isinstance(payload[0], int)
            or not isinstance(payload[1], str)
        ):
            raise InvalidToken(f"this {purpose.value} link is not valid")
        return TokenData(payload[0], payload[1])

    def matches(self, data: TokenData, email: str) -> bool:
        return hmac.compare_digest(data.email_fingerprint, email_fingerprint(self._secret, email))
