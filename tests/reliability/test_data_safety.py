"""Data safety: `subscribers export` / `import` round-trips every subscriber through the CLI,
and a database made by release 0.1 (schema 0001, rows written as that release wrote them)
upgrades to head without losing a row, reads back through the ORM, and keeps its ledger."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from conftest import make_settings, run_cli
from sqlalchemy import Engine, delete, inspect, select, text

from newsletter import db, subscribers
from newsletter.app import App
from newsletter.cli import run_send
from newsletter.models import (
    Delivery,
    DeliveryItem,
    DeliveryStatus,
    Entry,
    Feed,
    Frequency,
    Setting,
    Subscriber,
    SubscriberStatus,
)
from newsletter.sink import Sink

from .conftest import FigureRecorder
from .support import cli_env

PROFILE_FIELDS = ("email", "keywords", "exclude", "max_items", "timezone", "send_hour", "frequency")
STATUSES = list(SubscriberStatus)
ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/Los_Angeles",
    "Asia/Kolkata",
    "Pacific/Chatham",
    "America/St_Johns",
    "Australia/Lord_Howe",
]
KEYWORD_POOL = [
    "diffusion models",
    "Schrödinger bridge",
    "LLM",
    "zeroth-order",
    "bi-level",
    "graph neural networks",
    "量子",
    "équivariance",
    "RL",
    "C++",
    "k-means",
    "quantum optimization",
    "O(n log n)",
    "naïve Bayes",
]


def _profiles(n: int) -> list[tuple[subscribers.ProfileSpec, SubscriberStatus]]:
    """N varied profiles: every status, zone, hour, frequency; phrases, unicode, excludes,
    plus-addresses and an internationalized domain. File names are all distinct here; the
    addresses whose file names collide are test_export_file_names_never_collide's business."""
    out = []
    for i in range(n):
        local = ["reader", "first.last", "with+tag", "Mixed.Case"][i % 4]
        domain = ["example.org", "example.com", "bücher.example", "sub.example.net"][i // 4 % 4]
        k = 1 + i % 5
        spec = subscribers.ProfileSpec.from_mapping(
            {
                "email": f"{local}{i}@{domain}",
                "keywords": [KEYWORD_POOL[(i + j) % len(KEYWORD_POOL)] for j in range(k)],
                "exclude": [KEYWORD_POOL[(i + 7) % len(KEYWORD_POOL)]] if i % 3 == 0 else [],
                "max_items": 1 + (i * 7) % 50,
                "timezone": ZONES[i % len(ZONES)],
                "send_hour": (i * 5) % 24,
                "frequency": "weekly" if i % 4 == 1 else "daily",
            }
        )
        out.append((spec, STATUSES[i % len(STATUSES)]))
    return out


def _snapshot(app: App) -> dict[str, dict[str, Any]]:
    with app.session() as session:
        return {
            s.email: {
                **{f: getattr(s, f) for f in PROFILE_FIELDS},
                "status": s.status,
                "frequency": s.frequency.value,
            }
            for s in session.scalars(select(Subscriber))
        }


def _populate(app: App, n: int) -> None:
    with db.transaction(app.sessions) as session:
        for spec, status in _profiles(n):
            sub, created = subscribers.upsert(session, spec, status=status)
            assert created
            if status is not SubscriberStatus.ACTIVE:
                sub.status_reason = f"set to {status.value} by the test"


def _export_wipe_import(app: App, env: dict[str, str], tmp_path: Path) -> list[Path]:
    folder = tmp_path / "export"
    run_cli("subscribers", "export", str(folder), env=env, cwd=tmp_path)
    files = sorted(folder.glob("*.toml"))
    with db.transaction(app.sessions) as session:
        session.execute(delete(Subscriber))
    with app.session() as session:
        assert session.scalar(select(Subscriber.id)) is None, "wiped"
    run_cli("subscribers", "import", str(folder), env=env, cwd=tmp_path)
    return files


N_SUBSCRIBERS = 60


def test_export_import_round_trips_profiles(
    db_url: str, tmp_path: Path, figures: FigureRecorder
) -> None:
    app = App(make_settings(db_url, 1))
    app.init()
    _populate(app, N_SUBSCRIBERS)
    before = _snapshot(app)
    assert len(before) == N_SUBSCRIBERS
    assert {v["status"] for v in before.values()} == set(SubscriberStatus)

    files = _export_wipe_import(app, cli_env(db_url, 1), tmp_path)
    after = _snapshot(app)
    app.close()

    assert len(files) == N_SUBSCRIBERS, "one file per subscriber"
    assert set(after) == set(before), "every address is back"
    mismatched = {
        email: {
            f: (before[email][f], after[email][f])
            for f in PROFILE_FIELDS
            if before[email][f] != after[email][f]
        }
        for email in before
    }
    mismatched = {k: v for k, v in mismatched.items() if v}
    assert mismatched == {}, f"fields changed by export+import: {mismatched}"
    kept_status = sum(1 for e in before if before[e]["status"] == after[e]["status"])
    figures.add(
        "subscribers round-tripped",
        f"{len(after)}/{len(before)}",
        f"profile fields identical; status kept for {kept_status}/{len(before)}",
    )


def test_export_import_keeps_statuses(sqlite_url: str, tmp_path: Path) -> None:
    app = App(make_settings(sqlite_url, 1))
    app.init()
    _populate(app, 10)
    before = {e: v["status"] for e, v in _snapshot(app).items()}
    _export_wipe_import(app, cli_env(sqlite_url, 1), tmp_path)
    after = {e: v["status"] for e, v in _snapshot(app).items()}
    app.close()
    changed = {e: f"{before[e].value} -> {after[e].value}" for e in before if before[e] != after[e]}
    assert changed == {}, f"statuses lost in the round trip: {changed}"


def test_export_file_names_never_collide(sqlite_url: str, tmp_path: Path) -> None:
    app = App(make_settings(sqlite_url, 1))
    app.init()
    emails = [
        "o'brien@example.org",
        "o_brien@example.org",
        "anna@büch.example",
        "anna@bäch.example",
        "a&b@example.org",
        "a=b@example.org",
    ]
    with db.transaction(app.sessions) as session:
        for email in emails:
            spec = subscribers.ProfileSpec.from_mapping({"email": email, "keywords": [email]})
            subscribers.upsert(session, spec)
    _export_wipe_import(app, cli_env(sqlite_url, 1), tmp_path)
    after = set(_snapshot(app))
    app.close()
    assert after == {subscribers.validate_email(e) for e in emails}, (
        f"lost in export: {sorted({subscribers.validate_email(e) for e in emails} - after)}"
    )


# --- migrations from release 0.1 -----------------------------------------------------------------

T0 = datetime(2024, 11, 13, 5, 0, 0)  # naive UTC, as 0.1 stored it
TODAY = datetime.now(UTC).date().isoformat()


def _json(engine: Engine, name: str) -> str:
    # A JSON column takes text on SQLite; PostgreSQL wants the text cast.
    return f"CAST(:{name} AS JSON)" if engine.dialect.name == "postgresql" else f":{name}"


def _insert_release_01_rows(engine: Engine) -> dict[str, int]:
    """Rows written with plain SQL against schema 0001, the way release 0.1's code wrote them."""
    j = lambda name: _json(engine, name)  # noqa: E731
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO settings (key, value) VALUES ('secret_key', 'from-0.1')"))
        conn.execute(
            text(
                "INSERT INTO feeds (id, url, title, enabled, etag, last_modified, created_at, "
                "last_fetched_at, last_success_at, last_error, last_error_at, "
                "consecutive_failures, next_fetch_at) VALUES (:id, :url, :title, :enabled, "
                ":etag, :lm, :created, :fetched, :success, :error, :error_at, :failures, :next)"
            ),
            [
                {
                    "id": 1,
                    "url": "https://export.arxiv.org/rss/cs.LG",
                    "title": "cs.LG updates",
                    "enabled": True,
                    "etag": '"abc"',
                    "lm": "Wed, 13 Nov 2024 05:00:00 GMT",
                    "created": T0,
                    "fetched": T0,
                    "success": T0,
                    "error": None,
                    "error_at": None,
                    "failures": 0,
                    "next": None,
                },
                {
                    "id": 2,
                    "url": "/srv/feeds/local.xml",
                    "title": None,
                    "enabled": False,
                    "etag": None,
                    "lm": None,
                    "created": T0,
                    "fetched": T0,
                    "success": None,
                    "error": "HTTP 404 Not Found",
                    "error_at": T0,
                    "failures": 3,
                    "next": T0 + timedelta(minutes=20),
                },
            ],
        )
        entries = [
            {
                "id": 10 + i,
                "feed": 1,
                "guid": f"oai:arXiv.org:2411.0{i}",
                "title": title,
                "html": f"<p>{summary}</p>",
                "text": summary,
                "link": f"https://arxiv.org/abs/2411.0{i}",
                "authors": json.dumps(["Ada Lovelace", "Émile Borel"]),
                "categories": json.dumps(["cs.LG"]),
                "published": T0 if i else None,
                "fetched": datetime.now(UTC).replace(tzinfo=None),
            }
            for i, (title, summary) in enumerate(
                [
                    ("Diffusion models for Schrödinger bridges", "We study diffusion models."),
                    ("Equivariant networks", "An equivariant architecture."),
                    (
                        "Quantum optimization at scale",
                        "Quantum optimization with diffusion priors.",
                    ),
                ]
            )
        ]
        conn.execute(
            text(
                "INSERT INTO entries (id, feed_id, guid, title, summary_html, summary_text, link, "
                f"authors, categories, published, fetched_at) VALUES (:id, :feed, :guid, :title, "
                f":html, :text, :link, {j('authors')}, {j('categories')}, :published, :fetched)"
            ),
            entries,
        )
        subs = [
            (
                1,
                "ada@example.org",
                "active",
                ["diffusion models"],
                [],
                10,
                "Europe/Berlin",
                7,
                "daily",
                0,
                None,
            ),
            (
                2,
                "bob@example.org",
                "active",
                ["equivariant", "quantum optimization"],
                ["survey"],
                5,
                "UTC",
                6,
                "weekly",
                0,
                None,
            ),
            (
                3,
                "cy@example.org",
                "bounced",
                ["diffusion"],
                [],
                10,
                "UTC",
                7,
                "daily",
                1,
                "550 5.1.1 unknown user",
            ),
            (
                4,
                "dee@example.org",
                "unsubscribed",
                ["RL"],
                [],
                10,
                "Asia/Tokyo",
                8,
                "daily",
                0,
                "one-click unsubscribe",
            ),
            (
                5,
                "eve@example.org",
                "paused",
                ["Schrödinger bridge"],
                [],
                50,
                "UTC",
                23,
                "daily",
                0,
                None,
            ),
            (6, "fay@example.org", "pending", ["LLM"], [], 3, "UTC", 0, "daily", 0, None),
        ]
        conn.execute(
            text(
                "INSERT INTO subscribers (id, email, status, keywords, exclude, max_items, "
                "timezone, send_hour, frequency, failure_count, status_reason, created_at, "
                f"updated_at) VALUES (:id, :email, :status, {j('kw')}, {j('ex')}, :max, :tz, "
                ":hour, :freq, :failures, :reason, :t, :t)"
            ),
            [
                {
                    "id": i,
                    "email": e,
                    "status": st,
                    "kw": json.dumps(kw),
                    "ex": json.dumps(ex),
                    "max": mx,
                    "tz": tz,
                    "hour": h,
                    "freq": fr,
                    "failures": fc,
                    "reason": rs,
                    "t": T0,
                }
                for i, e, st, kw, ex, mx, tz, h, fr, fc, rs in subs
            ],
        )
        deliveries = [
            # ada: today's digest, already sent by 0.1; bob: an old one still pending (crash
            # before it went out); cy: failed with the 550 that bounced the address.
            {
                "id": 100,
                "sub": 1,
                "period": TODAY,
                "status": "sent",
                "attempts": 1,
                "next": T0,
                "by": None,
                "until": None,
                "mid": "<digest.a.1@example.org>",
                "reply": "250 2.0.0 OK: queued",
                "error": None,
                "created": T0,
                "sent": T0,
            },
            {
                "id": 101,
                "sub": 2,
                "period": "2024-W46",
                "status": "pending",
                "attempts": 0,
                "next": T0,
                "by": None,
                "until": None,
                "mid": "<digest.b.2@example.org>",
                "reply": None,
                "error": None,
                "created": T0,
                "sent": None,
            },
            {
                "id": 102,
                "sub": 3,
                "period": "2024-11-13",
                "status": "failed",
                "attempts": 1,
                "next": T0,
                "by": None,
                "until": None,
                "mid": "<digest.c.3@example.org>",
                "reply": "550 5.1.1 unknown user",
                "error": "550 5.1.1 unknown user",
                "created": T0,
                "sent": None,
            },
        ]
        conn.execute(
            text(
                "INSERT INTO deliveries (id, subscriber_id, period, status, attempts, "
                "next_attempt_at, claimed_by, claimed_until, message_id, smtp_reply, error, "
                "created_at, sent_at) VALUES (:id, :sub, :period, :status, :attempts, :next, "
                ":by, :until, :mid, :reply, :error, :created, :sent)"
            ),
            deliveries,
        )
        hits = json.dumps([{"keyword": "diffusion models", "title": True, "summary": True}])
        conn.execute(
            text(
                "INSERT INTO delivery_items (subscriber_id, entry_id, delivery_id, rank, hits) "
                f"VALUES (:sub, :entry, :delivery, :rank, {j('hits')})"
            ),
            [
                {"sub": 1, "entry": 10, "delivery": 100, "rank": 0, "hits": hits},
                {"sub": 2, "entry": 11, "delivery": 101, "rank": 0, "hits": hits},
                {"sub": 2, "entry": 12, "delivery": 101, "rank": 1, "hits": hits},
                {"sub": 3, "entry": 10, "delivery": 102, "rank": 0, "hits": hits},
            ],
        )
    return {
        "settings": 1,
        "feeds": 2,
        "entries": 3,
        "subscribers": 6,
        "deliveries": 3,
        "delivery_items": 4,
    }


_KEYS = {
    "settings": "key",
    "feeds": "id",
    "entries": "id",
    "subscribers": "id",
    "deliveries": "id",
    "delivery_items": "subscriber_id, entry_id",
}


def _raw_rows(engine: Engine, columns: dict[str, list[str]]) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    with engine.connect() as conn:
        for table, cols in columns.items():
            rows = conn.execute(
                text(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {_KEYS[table]}")
            )
            out[table] = [tuple(r) for r in rows]
    return out


def test_release_01_database_upgrades_without_loss(
    db_url: str, tmp_path: Path, figures: FigureRecorder
) -> None:
    engine = db.make_engine(db_url)
    db.upgrade(engine, "0001")
    assert db.current_revision(engine) == "0001"
    expected = _insert_release_01_rows(engine)
    inspector = inspect(engine)
    columns_01 = {t: [c["name"] for c in inspector.get_columns(t)] for t in expected}
    before = _raw_rows(engine, columns_01)

    db.upgrade(engine)
    assert db.current_revision(engine) == db.head_revision()
    after = _raw_rows(engine, columns_01)
    engine.dispose()
    kept = sum(len(rows) for rows in after.values())
    figures.add(
        "rows kept across migration",
        f"{kept}/{sum(expected.values())}",
        f"0001 -> {db.head_revision()}, {db_url.split(':')[0]}",
    )
    for table, rows in before.items():
        assert len(rows) == expected[table], table
        assert after[table] == rows, f"{table}: rows changed by the upgrade"

    # Through the ORM, with the types 0.1 never knew about (aware datetimes, enums, lists).
    with Sink(tmp_path / "sink", "127.0.0.1", 0) as sink:
        app = App(make_settings(db_url, sink.port, secret_key=""))
        app.check_ready()
        assert app.secret_key == "from-0.1", "the signing key survives, so old links still work"
        with app.session() as session:
            subs = {s.email: s for s in session.scalars(select(Subscriber))}
            assert subs["cy@example.org"].status is SubscriberStatus.BOUNCED
            assert subs["cy@example.org"].status_reason == "550 5.1.1 unknown user"
            assert subs["dee@example.org"].status is SubscriberStatus.UNSUBSCRIBED
            assert subs["bob@example.org"].keywords == ["equivariant", "quantum optimization"]
            assert subs["bob@example.org"].exclude == ["survey"]
            assert subs["bob@example.org"].frequency is Frequency.WEEKLY
            assert subs["eve@example.org"].keywords == ["Schrödinger bridge"]
            assert subs["ada@example.org"].created_at == T0.replace(tzinfo=UTC)
            assert all(s.confirmed_at is None for s in subs.values())
            feed = session.get(Feed, 2)
            assert feed is not None and not feed.enabled and feed.consecutive_failures == 3
            assert feed.next_fetch_at == (T0 + timedelta(minutes=20)).replace(tzinfo=UTC)
            entry = session.get(Entry, 10)
            assert entry is not None and entry.authors == ["Ada Lovelace", "Émile Borel"]
            assert entry.published is None and session.get(Entry, 11).published == T0.replace(
                tzinfo=UTC
            )
            sent = session.get(Delivery, 100)
            assert sent is not None and sent.status is DeliveryStatus.SENT
            assert [i.entry_id for i in sent.items] == [10]
            assert sent.items[0].hits[0]["keyword"] == "diffusion models"
            assert (
                session.scalar(select(Setting.value).where(Setting.key == "secret_key"))
                == "from-0.1"
            )

        # The ledger carries on: bob's pending digest goes out, ada's sent one does not go
        # out again, and ada is never sent paper 10 a second time.
        assert run_send(app) == 0
        received = [r for m in sink.messages() for r in m.rcpt_tos]
        with app.session() as session:
            states = dict(session.execute(select(Delivery.id, Delivery.status)).all())
            ada_items = set(
                session.scalars(
                    select(DeliveryItem.entry_id).where(DeliveryItem.subscriber_id == 1)
                )
            )
        app.close()
    assert states[101] is DeliveryStatus.SENT, "the pending 0.1 delivery was sent"
    assert states[102] is DeliveryStatus.FAILED
    assert "bob@example.org" in received
    assert received.count("ada@example.org") == 0, "ada already had today's digest"
    assert not {"cy@example.org", "dee@example.org", "eve@example.org", "fay@example.org"} & set(
        received
    )
    assert ada_items == {10}
