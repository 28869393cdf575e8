"""Subscribing over HTTP with double opt-in, on SQLite and PostgreSQL, with real email."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_web_support import Site, link_path, open_site, page, text_of

from newsletter.models import Frequency, SubscriberStatus
from newsletter.sink import Sink


@pytest.fixture
def site(db_url: str, sink: Sink) -> Iterator[Site]:
    with open_site(db_url, sink, papers=True) as s:
        yield s


def test_subscribe_confirm_welcome(site: Site) -> None:
    page = site.client.get("/")
    assert page.status_code == 200
    assert 'name="email"' in page.text and 'name="keywords"' in page.text
    assert '<label for="keywords">' in page.text

    answer = site.subscribe(
        "Ada@Example.org",
        "diffusion models\r\nequivariant",
        exclude="quantum",
        timezone="Europe/Berlin",
        send_hour="6",
        max_items="4",
    )
    assert answer.status_code == 200
    assert "Check your inbox" in answer.text
    sub = site.subscriber("ada@example.org")
    assert sub is not None and sub.status is SubscriberStatus.PENDING
    assert sub.keywords == ["diffusion models", "equivariant"] and sub.exclude == ["quantum"]
    assert (sub.timezone, sub.send_hour, sub.max_items) == ("Europe/Berlin", 6, 4)
    assert sub.link_sent_at is not None and sub.confirmed_at is None

    [confirm_mail] = site.mails("ada@example.org")
    assert confirm_mail.subject == "Confirm your paper digest subscription"
    assert confirm_mail.mail_from == "digest@example.org"
    assert "diffusion models, equivariant" in text_of(confirm_mail)
    confirm = link_path(confirm_mail, "confirm")

    # Opening the link (or a mail scanner fetching it) only shows a button.
    shown = site.client.get(confirm)
    assert shown.status_code == 200 and "Confirm subscription" in shown.text
    assert shown.headers["cache-control"] == "no-store"
    pending = site.subscriber("ada@example.org")
    assert pending is not None and pending.status is SubscriberStatus.PENDING

    welcome = site.post(confirm, {}, token_from=confirm)
    assert welcome.status_code == 200
    assert "Welcome! You are subscribed." in welcome.text
    assert "06:00" in welcome.text and "Europe/Berlin" in welcome.text
    assert "<mark>" in welcome.text  # a preview of papers, matched words highlighted
    assert "/manage/" in welcome.text and "/unsubscribe/" in welcome.text
    active = site.subscriber("ada@example.org")
    assert active is not None and active.status is SubscriberStatus.ACTIVE
    assert active.confirmed_at is not None

    [_, welcome_mail] = site.mails("ada@example.org")
    assert welcome_mail.subject == "You are subscribed to the paper digest"
    headers = welcome_mail.message
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "<https://digest.example.org/unsubscribe/" in headers["List-Unsubscribe"]
    assert "<mailto:unsubscribe@example.org?" in headers["List-Unsubscribe"]
    assert "/manage/" in text_of(welcome_mail)

    # A second click (or a double submit) confirms nothing new and sends no second welcome.
    again = site.post(confirm, {})
    assert again.status_code == 200 and "You are subscribed" in again.text
    assert len(site.mails("ada@example.org")) == 2
    assert "You are already subscribed" in site.client.get(confirm).text

    # After leaving, an old confirmation link does not sign them up again.
    unsubscribe = link_path(welcome_mail, "unsubscribe")
    assert site.client.post(unsubscribe, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    stale = site.client.get(confirm)
    assert stale.status_code == 400 and "no longer valid" in stale.text
    assert site.post(confirm, {}).status_code == 400
    gone = site.subscriber("ada@example.org")
    assert gone is not None and gone.status is SubscriberStatus.UNSUBSCRIBED


def test_active_subscription_is_never_overwritten_by_the_form(site: Site) -> None:
    site.add("bob@example.org", ["equivariant"], frequency="weekly")
    answer = site.subscribe("bob@example.org", "crypto scams", max_items="50")
    assert answer.status_code == 200 and "Check your inbox" in answer.text
    sub = site.subscriber("bob@example.org")
    assert sub is not None
    assert sub.status is SubscriberStatus.ACTIVE
    assert sub.keywords == ["equivariant"] and sub.max_items == 10
    assert sub.frequency is Frequency.WEEKLY
    # The owner gets a reminder of their settings link, not a confirmation.
    [mail] = site.mails("bob@example.org")
    assert mail.subject == "Your paper digest settings link"
    assert link_path(mail, "manage")


def test_cooldown_stops_repeated_mails_to_one_address(site: Site) -> None:
    first = site.subscribe("cy@example.org", "equivariant")
    second = site.subscribe("cy@example.org", "something else entirely")
    assert first.status_code == second.status_code == 200
    assert page(first.text) == page(second.text)
    assert len(site.mails("cy@example.org")) == 1
    sub = site.subscriber("cy@example.org")
    assert sub is not None and sub.keywords == ["equivariant"]


def test_pending_or_unsubscribed_address_gets_a_new_confirmation(db_url: str, sink: Sink) -> None:
    with open_site(db_url, sink, link_cooldown_seconds=0) as site:
        site.subscribe("dee@example.org", "equivariant")
        site.subscribe("dee@example.org", "bayesian optimization")
        sub = site.subscriber("dee@example.org")
        assert sub is not None and sub.status is SubscriberStatus.PENDING
        assert sub.keywords == ["bayesian optimization"]
        assert len(site.mails("dee@example.org")) == 2

        site.add("eve@example.org", ["x"], status=SubscriberStatus.UNSUBSCRIBED)
        site.subscribe("eve@example.org", "gaussian process")
        eve = site.subscriber("eve@example.org")
        assert eve is not None and eve.status is SubscriberStatus.PENDING
        [mail] = site.mails("eve@example.org")
        assert link_path(mail, "confirm")


def test_errors_are_shown_per_field_and_input_is_kept(sqlite_url: str, sink: Sink) -> None:
    with open_site(sqlite_url, sink) as site:
        answer = site.subscribe(
            "not-an-address",
            "ok words, <b>bold</b>",
            timezone="Mars/Olympus",
            max_items="500",
        )
        assert answer.status_code == 400
        text = answer.text
        assert 'id="email-error"' in text and "is not a valid address" in text
        assert 'id="keywords-error"' in text and "markup characters" in text
        assert 'id="timezone-error"' in text and "Mars/Olympus" in text
        assert 'id="max_items-error"' in text and "from 1 to 50" in text
        assert 'aria-invalid="true"' in text
        # What they typed is kept, escaped; markup never reaches the page as markup.
        assert 'value="not-an-address"' in text
        assert "ok words, &lt;b&gt;bold&lt;/b&gt;" in text and "<b>bold</b>" not in text
        assert '<details class="more" open>' in text  # the fields with errors are visible
        assert site.subscriber("not-an-address") is None
        assert site.mails() == []

        empty = site.subscribe("ada@example.org", "  ,  ")
        assert empty.status_code == 400 and "give at least one word" in empty.text.lower()


def test_preview_button_shows_matches_without_subscribing(sqlite_url: str, sink: Sink) -> None:
    with open_site(sqlite_url, sink, papers=True) as site:
        answer = site.subscribe("", "equivariant", action="preview", max_items="3")
        assert answer.status_code == 200
        assert "recent papers match" in answer.text
        assert answer.text.count('class="paper-title"') == 3
        assert (
            "<mark>Equivariant</mark>" in answer.text or "<mark>equivariant</mark>" in answer.text
        )
        assert 'id="email-error"' not in answer.text  # not submitted yet: no scolding
        assert site.mails() == []

        nothing = site.subscribe("", "zzzunmatchable", action="preview")
        assert "No recent paper matches yet" in nothing.text
