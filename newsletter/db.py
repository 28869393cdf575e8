"""Engine and session set-up, and schema migrations, for SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The schema revision this code needs: the migrations' head (a test keeps the two equal; bump
# it with each new migration). Every command compares the database's revision with it before
# it starts, and asking alembic for both imported its script and runtime machinery: 75 ms of
# the start of `send`, and of every other command, for two short strings.
SCHEMA_HEAD = "0005"


class DatabaseNotReady(RuntimeError):
    """The schema is missing or older than this code; the message says which command fixes it."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the web app read while a send writes; busy_timeout turns "database is locked"
    # into a short wait; foreign keys are off by default in SQLite. synchronous=FULL fsyncs each
    # commit, so a digest marked sent stays marked after a power cut, not just after a crash
    # (about 0.35 ms a commit here; the sender commits outcomes in groups).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _postgres_settings(dbapi_connection: Any, _record: Any) -> None:
    # psycopg prepares a statement it has run five times, and PostgreSQL then keeps a generic
    # plan for it, costed on the sizes its tables had at that moment. `send` grows the ledger
    # from nothing to a hundred thousand rows within one run: the outcome UPDATE planned when
    # `deliveries` held a few hundred rows scanned the whole table every time after (auto_explain
    # showed 0.9 ms and ~230 buffers for four rows, a third of the server's time at 100,000
    # readers). A plan made per execution costs ~0.1 ms and sees the table as it is.
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET plan_cache_mode = force_custom_plan")
    dbapi_connection.commit()


def make_engine(url: str, **kwargs: Any) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "postgresql":
        event.listen(engine, "connect", _postgres_settings)
    return engine


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


# Alembic is imported where migrations are looked at, not with this module: every process of
# `newsletter send` imports this one, and alembic was a sixth of its start-up.


def _alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(_alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    command.downgrade(_alembic_config(engine), revision)


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision, from alembic's version table (None before `init`)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        revisions = list(conn.scalars(text("SELECT version_num FROM alembic_version")))
    if len(revisions) > 1:  # branches this project does not make: say so, as alembic would
        raise DatabaseNotReady(
            f"the database records several schema revisions ({', '.join(map(str, revisions))}); "
            "this code expects one: merge them with alembic before running newsletter"
        )
    return str(revisions[0]) if revisions else None


def check_ready(engine: Engine) -> None:
    current = current_revision(engine)
    if current is None:
        raise DatabaseNotReady(
            f"the database at {engine.url.render_as_string(hide_password=True)} has no tables "
            "yet: run `newsletter init` first"
        )
    if current != SCHEMA_HEAD:
        raise DatabaseNotReady(
            f"the database schema is at {current}, this code needs {SCHEMA_HEAD}: "
            "run `newsletter db upgrade`"
        )
