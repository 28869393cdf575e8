from __future__ import annotations

import time

import pytest

from newsletter.tokens import InvalidToken, Purpose, Signer


def test_round_trip_and_binding_to_address() -> None:
    signer = Signer("k1")
    token = signer.make(Purpose.MANAGE, 42, "ada@example.org")
    data = signer.read(Purpose.MANAGE, token)
    assert data.subscriber_id == 42
    assert signer.matches(data, "ADA@example.org")
    assert not signer.matches(data, "eve@example.org")


def test_purposes_do_not_cross() -> None:
    signer = Signer("k1")
    confirm = signer.make(Purpose.CONFIRM, 1, "a@example.org")
    with pytest.raises(InvalidToken, match="unsubscribe link is not valid"):
        signer.read(Purpose.UNSUBSCRIBE, confirm)
    with pytest.raises(InvalidToken):
        signer.read(Purpose.MANAGE, confirm)


def test_forged_and_altered_tokens_fail() -> None:
    token = Signer("k1").make(Purpose.UNSUBSCRIBE, 1, "a@example.org")
    with pytest.raises(InvalidToken):
        Signer("another key").read(Purpose.UNSUBSCRIBE, token)
    altered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    with pytest.raises(InvalidToken):
        Signer("k1").read(Purpose.UNSUBSCRIBE, altered)


def test_expired_token_says_so() -> None:
    signer = Signer("k1")
    token = signer.make(Purpose.CONFIRM, 1, "a@example.org")
    time.sleep(1.1)
    with pytest.raises(InvalidToken, match="expired"):
        signer.read(Purpose.CONFIRM, token, max_age=0)
