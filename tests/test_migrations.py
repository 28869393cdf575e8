from __future__ import annotations

import pytest
from sqlalchemy import inspect

from newsletter import db


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
