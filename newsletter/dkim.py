"""DKIM signing (dkimpy), and `newsletter dkim keygen` to make a key and its DNS record.

Mailbox providers expect bulk mail to be authenticated. The signature covers the headers a
reader or a filter relies on, including List-Unsubscribe-Post, which dkimpy's default header
list leaves out: without it, a relay could strip one-click unsubscribe without breaking the
signature."""

from __future__ import annotations

from pathlib import Path

import click

from newsletter.config import Settings
from newsletter.envelope import bounce_domain

# dkimpy and cryptography are imported where a key is used or made: dkimpy brings dnspython,
# 70 ms of the start of every `send` process, which most deployments (no DKIM) never use.

SIGNED_HEADERS = (
    b"From",
    b"To",
    b"Subject",
    b"Date",
    b"Message-ID",
    b"List-Id",
    b"List-Unsubscribe",
    b"List-Unsubscribe-Post",
    b"Reply-To",
    b"MIME-Version",
    b"Content-Type",
)


class DkimConfigError(ValueError):
    pass


class Signer:
    """Signs finished messages; built once, so the key is read and parsed once."""

    def __init__(self, selector: str, domain: str, private_key_pem: bytes) -> None:
        self.selector = selector.encode("ascii")
        self.domain = domain.encode("ascii")
        self.key = private_key_pem

    @classmethod
    def from_settings(cls, settings: Settings) -> Signer | None:
        """None when DKIM is not configured (no selector)."""
        if not settings.dkim_selector:
            return None
        if settings.dkim_private_key:
            pem = settings.dkim_private_key.encode()
        elif settings.dkim_private_key_path:
            try:
                pem = Path(settings.dkim_private_key_path).read_bytes()
            except OSError as exc:
                raise DkimConfigError(f"dkim_private_key_path: cannot read: {exc}") from None
        else:
            raise DkimConfigError(
                "dkim_selector is set but there is no key: set dkim_private_key_path "
                "(make one with `newsletter dkim keygen`)"
            )
        domain = settings.dkim_domain or bounce_domain(settings.replace(bounce_domain=""))
        return cls(settings.dkim_selector, domain, pem)

    def sign(self, message: bytes) -> bytes:
        import dkim as dkimpy

        present = _header_names(message)
        include = [h for h in SIGNED_HEADERS if h.lower() in present]
        signature = dkimpy.sign(
            message,
            self.selector,
            self.domain,
            self.key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
            linesep=b"\r\n",
        )
        return bytes(signature) + message


def _header_names(message: bytes) -> set[bytes]:
    head = message.split(b"\r\n\r\n", 1)[0]
    return {
        line.split(b":", 1)[0].strip().lower()
        for line in head.split(b"\r\n")
        if line and not line[:1].isspace() and b":" in line
    }


def dns_record(selector: str, domain: str, public_pem: bytes) -> tuple[str, str]:
    """(name, value) of the TXT record, the value split into 255-character strings."""
    body = b"".join(
        line for line in public_pem.splitlines() if line and not line.startswith(b"-----")
    ).decode("ascii")
    value = f"v=DKIM1; k=rsa; p={body}"
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)]
    return f"{selector}._domainkey.{domain}", " ".join(f'"{c}"' for c in chunks)


def generate_key() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@click.group("dkim")
def dkim_group() -> None:
    """DKIM signing keys."""


@dkim_group.command("keygen")
@click.option("--selector", default="digest", show_default=True)
@click.option("--domain", help="Signing domain (default: the From address's domain).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("dkim-private.pem"),
    show_default=True,
    help="Where to write the private key (mode 600).",
)
@click.pass_context
def keygen(ctx: click.Context, selector: str, domain: str | None, out: Path) -> None:
    """Make a 2048-bit RSA key and print the DNS TXT record to publish."""
    settings = ctx.obj.settings
    domain = domain or bounce_domain(settings.replace(bounce_domain=""))
    if out.exists():
        raise click.ClickException(f"{out} exists; refusing to overwrite a key")
    private, public = generate_key()
    out.touch(mode=0o600)
    out.write_bytes(private)
    name, value = dns_record(selector, domain, public)
    click.echo(f"Private key written to {out}. Publish this TXT record:\n")
    click.echo(f"{name}. IN TXT {value}\n")
    click.echo(
        "Then set NEWSLETTER_DKIM_SELECTOR="
        f"{selector}, NEWSLETTER_DKIM_DOMAIN={domain} and "
        f"NEWSLETTER_DKIM_PRIVATE_KEY_PATH={out.resolve()}."
    )
