from __future__ import annotations

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from newsletter import db
from newsletter.models import Delivery, DeliveryItem, Subscriber


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    engine = db.make_engine(db_url)
    with pytest.raises(db.DatabaseNotReady, match="newsletter init"):
        db.check_ready(engine)
    db.upgrade(engine)
    assert db.current_revision(engine) == db.head_revision()
    db.check_ready(engine)
    tables = set(inspect(engine).get_table_names())
    assert {"feeds", "entries", "subscribers", "deliveries", "delivery_items"} <= tables
    db.downgrade(engine, "base")
    assert db.current_revision(engine) is None
    db.upgrade(engine)
    assert db.current_revision(engine) == db.head_revision()
    engine.dispose()


def test_the_head_the_code_checks_for_is_the_migrations_head() -> None:
    """`check_ready` compares with `db.SCHEMA_HEAD` rather than asking alembic (its import
    was 75 ms of every command's start): a new migration must bump it."""
    assert db.head_revision() == db.SCHEMA_HEAD, "set db.SCHEMA_HEAD to the new migration"


def test_models_match_migrations(db_url: str) -> None:
    """A model change without a migration fails here, not in production."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from newsletter.models import Base

    engine = db.make_engine(db_url)
    db.upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_to_0004_keeps_items_whose_delivery_exists(db_url: str) -> None:
    """0005's downgrade puts the items' key to deliveries back, after deleting the items the
    key would refuse (their delivery deleted while it was gone), and only those."""
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    with Session(engine) as session, session.begin():
        sub = Subscriber(email="ada@example.org", keywords=["diffusion"])
        session.add(sub)
        session.flush()
        kept = Delivery(subscriber_id=sub.id, period="2026-11-30", message_id="<k@x>")
        kept.items = [DeliveryItem(subscriber_id=sub.id, entry_id=1, rank=0, hits=[])]
        session.add(kept)
        session.flush()
        session.add(
            DeliveryItem(subscriber_id=sub.id, entry_id=2, delivery_id=kept.id + 1000, rank=0)
        )
    db.downgrade(engine, "0004")
    with engine.connect() as conn:
        left = conn.execute(text("SELECT entry_id FROM delivery_items")).scalars().all()
    keys = inspect(engine).get_foreign_keys("delivery_items")
    assert left == [1]
    assert [(k["referred_table"], k["constrained_columns"]) for k in keys] == [
        ("deliveries", ["delivery_id"])
    ]
    db.upgrade(engine)
    assert inspect(engine).get_foreign_keys("delivery_items") == []
    engine.dispose()


def test_several_recorded_revisions_are_refused(db_url: str) -> None:
    """`current_revision` reads alembic's table itself (see db.SCHEMA_HEAD); like alembic, it
    does not pick one of several heads."""
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('ffff')"))
    with pytest.raises(db.DatabaseNotReady, match="several schema revisions"):
        db.check_ready(engine)
    engine.dispose()
