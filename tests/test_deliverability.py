"""Every kind of email the product sends, checked with real tools: SpamAssassin's score (local
rules only), Python's strict parser (no defects in any part), the HTML size bound that keeps
Gmail from clipping, and the headers bulk senders must carry."""

from __future__ import annotations

import email
import email.policy
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from email.message import EmailMessage

import pytest

from newsletter.config import Settings
from newsletter.render import (
    Digest,
    Notice,
    Renderer,
    ShownPaper,
    make_item,
    new_message_id,
    stored_hits,
)

NOW = datetime(2026, 11, 22, 7, 0, tzinfo=UTC)
SETTINGS = Settings(
    from_addr="Paper Digest <digest@example.org>",
    base_url="https://digest.example.org",
    reply_to="editors@example.org",
    postal_address="Paper Digest, 1 Example Street, 10115 Berlin",
)
LONG_SUMMARY = (
    "Diffusion models have emerged as the state of the art for generative modelling of images, "
    "audio and molecules. We study their behaviour on inverse problems with noisy measurements "
    "and propose a sampler that is both faster and more accurate than previous approaches. "
) * 8


def _digest(n: int, summary: str = LONG_SUMMARY) -> Digest:
    items = [
        make_item(
            ShownPaper.of(
                title=f"Schrödinger bridges and diffusion models for inverse problems, part {i} "
                "of a long series of papers with deliberately long titles",
                link=f"https://papers.example.org/{i}",
                summary=summary,
                published=datetime(2026, 11, 20, tzinfo=UTC),
                authors=["A. Author", "B. Author", "C. Author"],
                source="Daily Papers",
            ),
            stored_hits(
                [
                    {"keyword": "diffusion models", "title": True, "summary": True},
                    {"keyword": "inverse problems", "title": True, "summary": True},
                ]
            ),
        )
        for i in range(n)
    ]
    return Digest(
        to="ada@example.org",
        period="2026-11-22",
        day=date(2026, 11, 22),
        items=items,
        manage_url="https://digest.example.org/manage/" + "M" * 80,
        unsubscribe_url="https://digest.example.org/unsubscribe/" + "U" * 80,
        unsubscribe_mailto="mailto:unsubscribe@example.org?subject=unsubscribe%20" + "U" * 80,
        message_id="<digest.2026-11-22.1.abc@example.org>",
    )


def _messages() -> dict[str, bytes]:
    r = Renderer(SETTINGS)
    links = {
        "manage_url": "https://digest.example.org/manage/M",
        "unsubscribe_url": "https://digest.example.org/unsubscribe/U",
    }
    unsub = {
        "unsubscribe_url": links["unsubscribe_url"],
        "unsubscribe_mailto": "mailto:unsubscribe@example.org?subject=unsubscribe%20U",
    }
    notices = {
        "confirm": Notice(
            "confirm",
            "ada@example.org",
            {
                "keywords": ["diffusion models"],
                "confirm_url": "https://digest.example.org/confirm/C",
            },
            new_message_id(r.domain, "confirm"),
        ),
        "welcome": Notice(
            "welcome",
            "ada@example.org",
            {
                "keywords": ["diffusion models"],
                "exclude": ["quantum"],
                "send_hour": 7,
                "timezone": "Europe/Berlin",
                **links,
            },
            new_message_id(r.domain, "welcome"),
            **unsub,
        ),
        "manage_link": Notice(
            "manage_link",
            "ada@example.org",
            {"manage_url": links["manage_url"]},
            new_message_id(r.domain, "manage_link"),
            **unsub,
        ),
    }
    out = {
        "digest (typical, 5 papers)": r.render_bytes(_digest(5, LONG_SUMMARY[:500]), now=NOW),
        "digest (largest, 50 papers)": r.render_bytes(_digest(50), now=NOW),
    }
    out.update({kind: r.notice_bytes(n, now=NOW) for kind, n in notices.items()})
    return out


MESSAGES = _messages()


def _spamassassin(raw: bytes) -> tuple[float, list[str]]:
    proc = subprocess.run(
        ["spamassassin", "-L", "-t"], input=raw, capture_output=True, timeout=120, check=True
    )
    report = proc.stdout.decode("utf-8", "replace")
    status = re.search(r"^X-Spam-Status: \w+, score=(-?[\d.]+)", report, re.M)
    assert status is not None, report[:2000]
    rules = re.findall(r"^\s*(-?\d+\.\d+)\s+([A-Z0-9_]+)\s", report, re.M)
    return float(status.group(1)), [f"{name} ({points})" for points, name in rules]


@pytest.mark.skipif(shutil.which("spamassassin") is None, reason="Debian's spamassassin missing")
def test_spamassassin_scores_stay_below_one_point() -> None:
    with ThreadPoolExecutor(4) as pool:
        scores = dict(zip(MESSAGES, pool.map(_spamassassin, MESSAGES.values()), strict=True))
    for kind, (score, rules) in scores.items():
        print(f"SpamAssassin {score:5.1f}  {kind}: {', '.join(rules) or 'no rules'}")
    for kind, (score, rules) in scores.items():
        assert score < 1.0, f"{kind} scored {score}: {rules}"
        # SpamAssassin parses MIME with its own (Perl) parser, independent of Python's; its
        # MIME_* rules flag structural defects (bad QP, long lines, missing headers...).
        assert not [r for r in rules if r.startswith(("MIME_", "MISSING_"))], (kind, rules)


@pytest.mark.parametrize("kind", list(MESSAGES))
def test_every_kind_parses_strictly_with_the_required_headers(kind: str) -> None:
    raw = MESSAGES[kind]
    msg = email.message_from_bytes(raw, policy=email.policy.strict)
    assert isinstance(msg, EmailMessage)
    for part in msg.walk():
        assert not part.defects, (kind, part.get_content_type(), part.defects)
    for header in ("From", "To", "Subject", "Date", "Message-ID", "List-Id", "Reply-To"):
        assert msg[header], f"{kind} lacks {header}"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    text, html = msg.iter_parts()
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert html["Content-Transfer-Encoding"] == "7bit", "ASCII HTML (mime.html_7bit)"
    for part in msg.iter_parts():
        assert part.get_content_charset() == "utf-8"
    if kind != "confirm":  # a confirmation goes to someone not (yet) subscribed
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert msg["List-Unsubscribe"].startswith("<https://")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    for part in msg.iter_parts():
        assert "1 Example Street" in part.get_content(), f"{kind}: contact line in every part"
    assert raw.split(b"\r\n\r\n", 1)[0].isascii(), "headers are ASCII (RFC 2047 where needed)"


def test_largest_digest_html_stays_under_gmail_clipping() -> None:
    msg = email.message_from_bytes(
        MESSAGES["digest (largest, 50 papers)"], policy=email.policy.default
    )
    assert isinstance(msg, EmailMessage)
    html = msg.get_body(("html",))
    assert html is not None
    size = len(html.get_content().encode("utf-8"))
    print(f"largest digest: HTML part {size / 1024:.1f} KB decoded")
    assert size < 100 * 1024
    assert "Read more" in html.get_content(), "long summaries are cut with a link"
    assert "http://" not in html.get_content().replace("http://www.w3.org", ""), "no external"
    assert "<img" not in html.get_content() and "<link" not in html.get_content()


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian's chromium missing")
def test_digest_screenshots_phone_and_desktop_light_and_dark() -> None:
    """Real headless Chromium at 375 and 800 px, light and dark; no external resource may be
    requested. The PNGs land in tests/artifacts/screenshots/ for a person to look at."""
    from pathlib import Path

    from playwright.sync_api import sync_playwright

    msg = email.message_from_bytes(
        MESSAGES["digest (typical, 5 papers)"], policy=email.policy.default
    )
    assert isinstance(msg, EmailMessage)
    body = msg.get_body(("html",))
    assert body is not None
    html = body.get_content()
    out = Path(__file__).parent / "artifacts" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            for width in (375, 800):
                for scheme in ("light", "dark"):
                    page = browser.new_page(
                        viewport={"width": width, "height": 900}, color_scheme=scheme
                    )
                    page.route(
                        "**/*", lambda route: (requested.append(route.request.url), route.abort())
                    )
                    page.set_content(html)
                    overflow = page.evaluate(
                        "document.documentElement.scrollWidth - window.innerWidth"
                    )
                    assert overflow <= 1, f"{width}px {scheme}: scrolls sideways by {overflow}px"
                    path = out / f"email-digest-{width}-{scheme}.png"
                    page.screenshot(path=str(path), full_page=True)
                    assert path.stat().st_size > 10_000
                    if scheme == "dark":
                        bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
                        assert bg == "rgb(17, 24, 39)", f"dark mode applies: {bg}"
                    page.close()
        finally:
            browser.close()
    assert requested == [], f"the email asked for external resources: {requested}"
