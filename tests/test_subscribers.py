from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_settings
from sqlalchemy import func, select

from newsletter import db, subscribers
from newsletter.app import App
from newsletter.models import Subscriber, SubscriberStatus
from newsletter.subscribers import InvalidProfile, ProfileSpec

REPO = Path(__file__).parent.parent


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"email": "nobody"}, "not a valid address"),
        ({"email": "a@example.org\r\nBcc: x@evil.example"}, "line breaks"),
        ({"email": "a@example.org", "keywords": []}, "at least one"),
        ({"email": "a@example.org", "keywords": ["ok", "bad\nword"]}, "keywords:"),
        ({"email": "a@example.org", "keywords": ["<b>x</b>"]}, "keywords:"),
        ({"email": "a@example.org", "keywords": ["x"], "timezone": "Mars/Olympus"}, "timezone"),
        ({"email": "a@example.org", "keywords": ["x"], "send_hour": 24}, "send_hour"),
        ({"email": "a@example.org", "keywords": ["x"], "max_items": 0}, "max_items"),
        ({"email": "a@example.org", "keywords": ["x"], "frequency": "hourly"}, "frequency"),
        ({"email": "a@example.org", "keywords": ["x"], "colour": "red"}, "unknown field"),
    ],
)
def test_invalid_profiles_are_refused_with_the_field_named(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidProfile, match=message):
        ProfileSpec.from_mapping(fields)


def test_address_is_normalized() -> None:
    spec = ProfileSpec.from_mapping(
        {"email": "  Ada@Example.ORG ", "keywords": "diffusion,  large   models\nLLM, llm"}
    )
    assert spec.email == "ada@example.org"
    assert spec.keywords == ["diffusion", "large models", "LLM"], "split, tidied, deduplicated"


def test_shipped_profiles_are_valid() -> None:
    paths = subscribers.profile_paths(REPO / "subscribers")
    assert len(paths) >= 3
    for path in paths:
        assert subscribers.load_profile(path).keywords


def test_import_export_round_trip(db_url: str, tmp_path: Path) -> None:
    app = App(make_settings(db_url, 1025))
    app.init()
    paths = subscribers.profile_paths(REPO / "subscribers")
    broken = tmp_path / "broken.toml"
    broken.write_text('email = "x@example.org"\nkeywords = [\n', encoding="utf-8")
    with db.transaction(app.sessions) as session:
        report = subscribers.import_profiles(session, [*paths, broken])
    assert len(report.created) == len(paths)
    assert len(report.errors) == 1 and "broken.toml" in report.errors[0]

    with db.transaction(app.sessions) as session:
        again = subscribers.import_profiles(session, paths)
        count = session.scalar(select(func.count()).select_from(Subscriber))
        statuses = set(session.scalars(select(Subscriber.status)))
    assert len(again.updated) == len(paths) and not again.created
    assert count == len(paths), "importing again never duplicates"
    assert statuses == {SubscriberStatus.ACTIVE}

    out = tmp_path / "export"
    with app.session() as session:
        written = subscribers.export_profiles(session, out)
    assert len(written) == len(paths)
    originals = {subscribers.load_profile(p).email: subscribers.load_profile(p) for p in paths}
    for path in written:
        exported = subscribers.load_profile(path)
        assert exported == originals[exported.email]
    app.close()
