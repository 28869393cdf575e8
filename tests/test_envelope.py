from __future__ import annotations

from newsletter.config import Settings
from newsletter.envelope import envelope_sender, parse_verp


def test_verp_round_trip_and_forgery() -> None:
    settings = Settings(from_addr="Digest <digest@example.org>")
    address = envelope_sender(settings, "secret", 123456)
    assert address.startswith("bounces+") and address.endswith("@example.org")
    assert parse_verp("secret", address) == 123456
    assert parse_verp("secret", f"<{address.upper()}>") == 123456, "case-insensitive, brackets"
    assert parse_verp("other-secret", address) is None, "signed with our key only"
    local, domain = address.split("@")
    forged = local[:-1] + ("0" if local[-1] != "0" else "1") + "@" + domain
    assert parse_verp("secret", forged) is None
    assert parse_verp("secret", "someone@example.org") is None
    assert envelope_sender(Settings(bounce_domain="b.example.net"), "s", 1).endswith(
        "@b.example.net"
    )
