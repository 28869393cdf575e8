"""DKIM: messages are signed over the headers that matter (List-Unsubscribe-Post included), an
independent verifier accepts them with the published key, and any changed header breaks them."""

from __future__ import annotations

import base64
import re
from datetime import UTC, date, datetime
from pathlib import Path

import dkim as dkimpy
import pytest
from conftest import run_cli
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from newsletter.config import Settings
from newsletter.dkim import dns_record, generate_key
from newsletter.render import Digest, Renderer, ShownPaper, make_item, stored_hits

NOW = datetime(2026, 11, 22, 7, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_key()


def _digest() -> Digest:
    item = make_item(
        ShownPaper.of(
            title="Light Schrödinger Bridge",
            link="https://papers.example.org/x",
            summary="We study diffusion models.",
            published=None,
            authors=[],
            source="Daily Papers",
        ),
        stored_hits([{"keyword": "diffusion models", "title": False, "summary": True}]),
    )
    return Digest(
        to="ada@example.org",
        period="2026-11-22",
        day=date(2026, 11, 22),
        items=[item],
        manage_url="https://digest.example.org/manage/T",
        unsubscribe_url="https://digest.example.org/unsubscribe/T",
        unsubscribe_mailto="mailto:unsubscribe@example.org?subject=unsubscribe%20T",
        message_id="<d.1@example.org>",
    )


def _signed(keys: tuple[bytes, bytes]) -> bytes:
    settings = Settings(
        from_addr="Paper Digest <digest@example.org>",
        dkim_selector="digest",
        dkim_private_key=keys[0].decode(),
    )
    return Renderer(settings).render_bytes(_digest(), now=NOW)


def _dns(keys: tuple[bytes, bytes]) -> bytes:
    _, value = dns_record("digest", "example.org", keys[1])
    return "".join(re.findall(r'"([^"]*)"', value)).encode()


def test_signature_covers_the_headers_that_matter(keys: tuple[bytes, bytes]) -> None:
    raw = _signed(keys)
    assert raw.startswith(b"DKIM-Signature:")
    header = raw.split(b"\r\n\r\n", 1)[0].decode()
    signed = re.search(r"h=([^;]+);", header.replace("\r\n", "").replace(" ", ""))
    assert signed is not None
    names = {n.lower() for n in signed.group(1).split(":")}
    assert {
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "list-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
    } <= names
    assert "d=example.org" in header.replace(" ", "") and "s=digest" in header.replace(" ", "")


def test_verifies_with_the_published_key_and_breaks_on_change(keys: tuple[bytes, bytes]) -> None:
    raw = _signed(keys)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"digest._domainkey.example.org."
        return _dns(keys)

    assert dkimpy.verify(raw, dnsfunc=dnsfunc)
    for old, new in [
        (b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"List-Unsubscribe-Post: x"),
        (b"Message-ID: <d.1@example.org>", b"Message-ID: <d.2@example.org>"),
        (b"To: ada@example.org", b"To: eve@example.org"),
    ]:
        assert old in raw
        assert not dkimpy.verify(raw.replace(old, new), dnsfunc=dnsfunc), old


def test_body_hash_checked_independently(keys: tuple[bytes, bytes]) -> None:
    """A second implementation of the parts that matter: the body hash (relaxed body
    canonicalization, RFC 6376 3.4.4) and the RSA signature over the header hash, with the
    public key from the DNS record through `cryptography`, not dkimpy."""
    raw = _signed(keys)
    head, body = raw.split(b"\r\n\r\n", 1)
    unfolded = re.sub(rb"\r\n[ \t]", b" ", head)
    sig_line = next(line for line in unfolded.split(b"\r\n") if line.startswith(b"DKIM-Signature"))
    tags = dict(
        t.strip().split(b"=", 1) for t in sig_line.split(b":", 1)[1].split(b";") if b"=" in t
    )
    lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" \t") for line in body.split(b"\r\n")]
    while lines and lines[-1] == b"":
        lines.pop()
    canonical = b"\r\n".join(lines) + b"\r\n"
    import hashlib

    assert base64.b64encode(hashlib.sha256(canonical).digest()) == tags[b"bh"].replace(b" ", b"")
    # Header hash: relaxed canonicalization of each signed header, then the signature header
    # with b= emptied.
    fields = {}
    for line in unfolded.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields.setdefault(name.strip().lower(), value)
    data = b""
    for name in tags[b"h"].replace(b" ", b"").split(b":"):
        value = fields[name.lower()]
        data += name.lower() + b":" + re.sub(rb"\s+", b" ", value).strip() + b"\r\n"
    sig_value = sig_line.split(b":", 1)[1]
    sig_value = re.sub(rb"b=[^;]*$", b"b=", re.sub(rb"\s+", b" ", sig_value).strip())
    data += b"dkim-signature:" + sig_value
    public = serialization.load_der_public_key(base64.b64decode(_dns(keys).split(b"p=", 1)[1]))
    signature = base64.b64decode(re.sub(rb"\s", b"", tags[b"b"]))
    public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg,arg-type]


def test_keygen_prints_the_dns_record(tmp_path: Path) -> None:
    out = run_cli(
        "dkim",
        "keygen",
        "--domain",
        "example.org",
        "--out",
        "k.pem",
        env={"NEWSLETTER_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"},
        cwd=tmp_path,
    ).stdout
    assert 'digest._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=' in out
    assert (tmp_path / "k.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0, "private key readable by owner only"
