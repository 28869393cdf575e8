"""Alembic environment: runs against the engine handed over by ``newsletter.db.upgrade``, or
against NEWSLETTER_DATABASE_URL when invoked through the alembic command line."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from newsletter.config import load_settings
from newsletter.db import make_engine
from newsletter.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if not isinstance(engine, Engine):
        engine = make_engine(load_settings().database_url)
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        context.run_migrations()


run_migrations_online()
