"""The settings page behind the signed link in every digest, and its preview."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import update
from test_web_support import Site, open_site

from newsletter import db
from newsletter.models import Frequency, Subscriber, SubscriberStatus
from newsletter.sink import Sink
from newsletter.tokens import Purpose

FORM = {
    "keywords": "equivariant",
    "exclude": "",
    "frequency": "daily",
    "max_items": "10",
    "timezone": "UTC",
    "send_hour": "7",
}


@pytest.fixture
def site(db_url: str, sink: Sink) -> Iterator[Site]:
    with open_site(db_url, sink, papers=True) as s:
        yield s


def test_edit_keywords_schedule_and_pause(site: Site) -> None:
    sub = site.add("ada@example.org", ["diffusion models"], exclude=["quantum"])
    path = f"/manage/{site.token(Purpose.MANAGE, sub)}"

    page = site.client.get(path)
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert "ada@example.org" in page.text
    assert ">diffusion models</textarea>" in page.text and ">quantum</textarea>" in page.text
    assert "<mark>Diffusion Models</mark>" in page.text or "<mark>diffusion models" in page.text
    # A saved zone is never replaced by the browser's guess (only the signup form guesses).
    assert 'data-guess="no"' in page.text and 'data-guess="yes"' in site.client.get("/").text

    saved = site.post(
        path,
        {
            **FORM,
            "keywords": "equivariant\r\nSchrödinger bridge",
            "exclude": "tensor",
            "frequency": "weekly",
            "max_items": "3",
            "timezone": "Asia/Tokyo",
            "send_hour": "21",
            "action": "save",
        },
        token_from=path,
    )
    assert saved.status_code == 303
    assert saved.headers["location"] == f"{path}?saved=1"
    after = site.client.get(saved.headers["location"])
    assert "Saved." in after.text and "next digest" in after.text
    row = site.subscriber("ada@example.org")
    assert row is not None
    assert row.keywords == ["equivariant", "Schrödinger bridge"] and row.exclude == ["tensor"]
    assert (row.frequency, row.max_items, row.timezone, row.send_hour) == (
        Frequency.WEEKLY,
        3,
        "Asia/Tokyo",
        21,
    )
    assert row.status is SubscriberStatus.ACTIVE

    site.post(path, {**FORM, "frequency": "paused", "action": "save"}, token_from=path)
    paused = site.subscriber("ada@example.org")
    assert paused is not None and paused.status is SubscriberStatus.PAUSED
    assert paused.frequency is Frequency.WEEKLY  # remembered for when they come back
    assert 'value="paused" checked' in site.client.get(path).text

    site.post(path, {**FORM, "frequency": "daily", "action": "save"}, token_from=path)
    back = site.subscriber("ada@example.org")
    assert back is not None and back.status is SubscriberStatus.ACTIVE
    assert back.frequency is Frequency.DAILY


def test_preview_shows_new_matches_without_saving(site: Site) -> None:
    sub = site.add("bob@example.org", ["diffusion models"])
    path = f"/manage/{site.token(Purpose.MANAGE, sub)}"
    before = site.client.get(path).text
    assert "Gaunt Tensor" not in before

    preview = site.post(
        path, {**FORM, "keywords": "gaunt tensor", "action": "preview"}, token_from=path
    )
    assert preview.status_code == 200
    assert "<mark>Gaunt Tensor</mark>" in preview.text
    assert "nothing is saved" in preview.text
    assert ">gaunt tensor</textarea>" in preview.text  # the form keeps the unsaved words
    row = site.subscriber("bob@example.org")
    assert row is not None and row.keywords == ["diffusion models"]

    # The same preview as a fragment, for the page's script.
    fragment = site.post("/preview", {"keywords": "gaunt tensor"}, token_from=path)
    assert fragment.status_code == 200
    assert "<mark>Gaunt Tensor</mark>" in fragment.text and "<html" not in fragment.text
    assert site.client.post("/preview", data={"keywords": "gaunt tensor"}).status_code == 403


def test_invalid_settings_are_refused_with_the_input_kept(site: Site) -> None:
    sub = site.add("cy@example.org", ["equivariant"])
    path = f"/manage/{site.token(Purpose.MANAGE, sub)}"
    bad = site.post(
        path,
        {**FORM, "keywords": "fine, x" * 1000, "send_hour": "25", "action": "save"},
        token_from=path,
    )
    assert bad.status_code == 400
    assert 'id="keywords-error"' in bad.text and "Too long" in bad.text
    assert 'id="send_hour-error"' in bad.text
    row = site.subscriber("cy@example.org")
    assert row is not None and row.keywords == ["equivariant"] and row.send_hour == 7


def test_unsubscribed_reader_can_come_back_from_the_settings_page(site: Site) -> None:
    sub = site.add("dee@example.org", ["equivariant"], status=SubscriberStatus.UNSUBSCRIBED)
    path = f"/manage/{site.token(Purpose.MANAGE, sub)}"
    assert "You are unsubscribed" in site.client.get(path).text
    site.post(path, {**FORM, "action": "save"}, token_from=path)
    row = site.subscriber("dee@example.org")
    assert row is not None and row.status is SubscriberStatus.ACTIVE


def test_link_for_a_changed_address_no_longer_works(site: Site) -> None:
    sub = site.add("eve@example.org", ["equivariant"])
    path = f"/manage/{site.token(Purpose.MANAGE, sub)}"
    with db.transaction(site.app.sessions) as session:
        session.execute(
            update(Subscriber).where(Subscriber.id == sub.id).values(email="zed@example.org")
        )
    gone = site.client.get(path)
    assert gone.status_code == 404
    assert "no longer exists" in gone.text and 'href="/"' in gone.text
    refused = site.post(path, {**FORM, "action": "save"})
    assert refused.status_code == 404
