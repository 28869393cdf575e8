"""A reader's whole life with the service, in real headless Chromium against a real uvicorn,
a real database and the real SMTP sink: subscribe, confirm from the email, get a digest,
change interests from the digest's link, get a digest that reflects it, leave with one click.

Screenshots of every main page, at phone (375 px) and desktop (1000 px) width, go to
tests/artifacts/screenshots/ for people to look at.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
from conftest import make_settings
from sqlalchemy import select, text
from test_web_support import free_port, ingest_fixture_feed, link_path, running_server, text_of

from newsletter import db
from newsletter.app import App
from newsletter.cli import run_send
from newsletter.models import DeliveryItem, Subscriber, SubscriberStatus
from newsletter.sink import Sink, SinkMessage
from newsletter.web import create_app

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).parent / "artifacts" / "screenshots"
WIDTHS = (375, 1000)
READER = "ada@example.org"
PREVIEW_MARKS_EQUIVARIANT = """() => /equivariant/i.test(
    [...document.querySelectorAll('#preview mark')].map(m => m.textContent).join(' '))"""

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (CI installs Debian's chromium)"
)

if CHROMIUM.exists():
    from playwright.sync_api import Browser, Page, sync_playwright


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    playwright = sync_playwright().start()
    chromium = playwright.chromium.launch(
        executable_path=str(CHROMIUM),
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
        yield chromium
    finally:
        chromium.close()
        playwright.stop()


def shoot(page: Page, name: str, *, dark: bool = False) -> None:
    """Full-page screenshots at each width, then back to desktop."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    if dark:
        page.emulate_media(color_scheme="dark")
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        suffix = "-dark" if dark else ""
        page.screenshot(path=str(SHOTS / f"{name}{suffix}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1000, "height": 900})
    if dark:
        page.emulate_media(color_scheme="light")


def shoot_frame(page: Page, name: str) -> None:
    """The mail viewer page, plus the email's HTML on its own: Chromium runs the sandboxed
    frame in another process, which full-page screenshots leave blank."""
    frame = page.frame_locator("iframe")
    frame.locator("body").wait_for()
    shoot(page, name)
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.locator("iframe").screenshot(path=str(SHOTS / f"{name}-html-{width}.png"))
    page.set_viewport_size({"width": 1000, "height": 900})


def wait_for_mail(sink: Sink, to: str, count: int, timeout: float = 15) -> list[SinkMessage]:
    """Notices go out after the page has answered; give the background task a moment."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in sink.messages() if to in m.rcpt_tos]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"{to} has {len(found)} message(s), wanted {count}"
        time.sleep(0.05)


def html_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


def matched_keywords(message: SinkMessage) -> set[str]:
    """The "matched: …" line under each paper of a digest's text part."""
    return set(re.findall(r"matched: (.+?) \(in ", " ".join(text_of(message).split())))


def delivered(app: App) -> list[set[int]]:
    """The papers of each digest the ledger recorded, oldest digest first."""
    with app.session() as session:
        rows = session.execute(
            select(DeliveryItem.delivery_id, DeliveryItem.entry_id).order_by(
                DeliveryItem.delivery_id
            )
        )
        out: dict[int, set[int]] = {}
        for delivery_id, entry_id in rows:
            out.setdefault(delivery_id, set()).add(entry_id)
    return [out[k] for k in sorted(out)]


def status_of(app: App) -> SubscriberStatus:
    with app.session() as session:
        sub = session.query(Subscriber).filter_by(email=READER).one()
        return sub.status


def test_a_readers_life(browser: Browser, sqlite_url: str, sink: Sink) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    app = App(make_settings(sqlite_url, sink.port, base_url=base))
    app.init()
    ingest_fixture_feed(app)
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    context = browser.new_context(
        viewport={"width": 1000, "height": 900}, timezone_id="Europe/Berlin", locale="en-GB"
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        with running_server(create_app(app, sink_dir=sink.maildir), port):
            # -- subscribe: the time zone comes from the browser, the preview updates live --
            page.goto(base + "/")
            assert page.locator("#timezone").input_value() == "Europe/Berlin"
            shoot(page, "01-subscribe")
            shoot(page, "01-subscribe", dark=True)
            page.fill("#email", READER)
            page.fill("#keywords", "diffusion models")
            page.locator("#preview mark").first.wait_for(timeout=10_000)
            assert "recent papers match" in page.inner_text("#preview")
            shoot(page, "02-subscribe-live-preview")
            page.click("button[value=subscribe]")
            page.wait_for_url(base + "/")
            assert page.locator("h1").inner_text() == "Check your inbox"
            shoot(page, "03-check-inbox")

            # -- the confirmation email, read in the development mail viewer --
            [confirm_mail] = wait_for_mail(sink, READER, 1)
            assert status_of(app) is SubscriberStatus.PENDING
            page.goto(base + "/_sink")
            shoot(page, "04-sink-list")
            page.click("text=Confirm your paper digest subscription")
            page.wait_for_url(re.compile(r".*/_sink/.+"))
            shoot_frame(page, "05-sink-message")
            page.click(f"a[href='{base}{link_path(confirm_mail, 'confirm')}']")
            page.wait_for_url(re.compile(r".*/confirm/.+"))
            assert status_of(app) is SubscriberStatus.PENDING  # opening the link is not enough
            shoot(page, "06-confirm")
            page.click("text=Confirm subscription")
            page.wait_for_selector("text=Welcome! You are subscribed.")
            assert page.locator("mark").count() > 0
            assert status_of(app) is SubscriberStatus.ACTIVE
            shoot(page, "07-welcome")
            wait_for_mail(sink, READER, 2)

            # -- the first digest --
            assert run_send(app) == 0
            first = wait_for_mail(sink, READER, 3)[-1]
            assert "new paper" in first.subject
            assert matched_keywords(first) == {"diffusion models"}
            assert re.search(r"<mark[^>]*>diffusion models?</mark>", html_of(first.message), re.I)

            # -- change interests from the digest's manage link; the preview follows --
            page.goto(base + link_path(first, "manage"))
            assert page.locator("#keywords").input_value() == "diffusion models"
            # The zone the signup form guessed from the browser was saved with the rest.
            assert page.locator("#timezone").input_value() == "Europe/Berlin"
            shoot(page, "08-manage")
            page.fill("#keywords", "equivariant")
            page.wait_for_function(PREVIEW_MARKS_EQUIVARIANT, timeout=10_000)
            page.click("button[value=preview]")  # the no-script path: a full page, not saved
            page.wait_for_selector("text=nothing is saved")
            assert "Equivariant" in page.inner_text("#preview")
            shoot(page, "09-manage-preview")
            shoot(page, "09-manage-preview", dark=True)
            page.click("button[value=save]")
            page.wait_for_selector("text=Saved.")
            shoot(page, "10-manage-saved")
            with app.session() as session:
                sub = session.query(Subscriber).filter_by(email=READER).one()
                assert sub.keywords == ["equivariant"]

            # -- the next digest reflects it (a new period, and no paper twice) --
            with db.transaction(app.sessions) as session:
                session.execute(text("UPDATE deliveries SET period='2000-01-01'"))
            assert run_send(app) == 0
            second = wait_for_mail(sink, READER, 4)[-1]
            assert matched_keywords(second) == {"equivariant"}
            assert re.search(r"<mark[^>]*>equivariant</mark>", html_of(second.message), re.I)
            first_papers, second_papers = delivered(app)
            assert second_papers and not (first_papers & second_papers)

            # -- the unsubscribe page never unsubscribes by itself --
            unsubscribe_path = link_path(second, "unsubscribe")
            page.goto(base + unsubscribe_path)
            assert page.locator("button").count() == 1
            assert status_of(app) is SubscriberStatus.ACTIVE
            shoot(page, "11-unsubscribe")

            # -- one-click unsubscribe, as the mail client does it (RFC 8058) --
            header = str(second.message["List-Unsubscribe"])
            one_click = re.search(r"<(http[^>]+)>", header)
            assert one_click and one_click.group(1) == base + unsubscribe_path
            assert second.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            answer = httpx.post(
                one_click.group(1),
                data={"List-Unsubscribe": "One-Click"},
                follow_redirects=False,
                timeout=10,
            )
            assert answer.status_code == 200
            assert status_of(app) is SubscriberStatus.UNSUBSCRIBED
            page.reload()
            assert "already unsubscribed" in page.inner_text("h1")
            shoot(page, "12-unsubscribed")

            # -- and nothing more arrives --
            with db.transaction(app.sessions) as session:
                session.execute(
                    text("UPDATE deliveries SET period='1999-01-01' WHERE period <> '2000-01-01'")
                )
            assert run_send(app) == 0
            time.sleep(0.2)
            assert len([m for m in sink.messages() if READER in m.rcpt_tos]) == 4

            # -- the remaining pages, for the record --
            page.goto(base + "/link")
            shoot(page, "13-link-request")
            page.goto(base + "/manage/not-a-real-token")
            shoot(page, "14-bad-link")
            page.goto(base + "/_sink")
            page.locator(".msgs a", has_text="new paper").first.click()
            shoot_frame(page, "15-sink-digest")
            shoot(page, "15-sink-digest", dark=True)
    finally:
        context.close()
        app.close()
    assert not [e for e in errors if "Content Security Policy" in e], errors
