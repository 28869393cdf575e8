"""Shared fixtures: real databases (a SQLite file and the PostgreSQL named by
NEWSLETTER_TEST_DATABASE_URL), a real SMTP sink on a free port, the real feed fixtures."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, text

from newsletter.app import App
from newsletter.config import Settings
from newsletter.sink import Sink

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent
RSS_FIXTURE = DATA / "daily-papers.rss.xml"
ATOM_FIXTURE = DATA / "daily-papers.atom.xml"
PG_ENV = "NEWSLETTER_TEST_DATABASE_URL"
_NON_ASCII_REF = re.compile(r"&#(\d+);")


def html_source(message: EmailMessage) -> str:
    """A message's HTML as a browser reads its characters: the 7bit HTML part writes every
    character outside ASCII as a numeric reference (``&#233;``), turned back here; every other
    reference (``&lt;``) stays, so a check that a hostile title is escaped still means it."""
    part = message.get_body(("html",))
    assert part is not None, "no HTML part"
    source = str(part.get_content()).replace("\r\n", "\n")
    return _NON_ASCII_REF.sub(lambda m: chr(int(m[1])) if int(m[1]) > 127 else m[0], source)


def _pg_base_url() -> str | None:
    return os.environ.get(PG_ENV) or None


@pytest.fixture(scope="session")
def pg_base_url() -> str:
    url = _pg_base_url()
    if url is None:
        if os.environ.get("CI"):
            pytest.fail(f"{PG_ENV} is not set; `./dev test` sets it and starts PostgreSQL")
        pytest.skip(f"{PG_ENV} not set: run the suite with `./dev test` to include PostgreSQL")
    return url


@pytest.fixture
def pg_url(pg_base_url: str) -> Iterator[str]:
    """A private schema per test: tests (and concurrent runs) never see each other's rows."""
    schema = f"t_{os.getpid()}_{secrets.token_hex(4)}"
    admin = create_engine(pg_base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(pg_base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'newsletter.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Every test that takes this runs twice: on a SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    with Sink(tmp_path / "sink", "127.0.0.1", 0) as running:
        yield running


def make_settings(db_url: str, smtp_port: int, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "database_url": db_url,
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp_port,
        "secret_key": "test-secret-key-not-for-production",
        "base_url": "https://digest.example.org",
        "from_addr": "Paper Digest <digest@example.org>",
        "list_id": "Paper Digest <digest.example.org>",
        "smtp_timeout": 5.0,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 0.2,
        "smtp_connections": 2,
        "entry_window_days": 36500,
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def app(db_url: str, sink: Sink) -> Iterator[App]:
    instance = App(make_settings(db_url, sink.port))
    instance.init()
    yield instance
    instance.close()


def run_cli(
    *args: str, env: dict[str, str], cwd: Path, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a subprocess, as a user would run it."""
    proc = subprocess.run(
        [sys.executable, "-m", "newsletter", *args],
        env={**os.environ, **env, "COLUMNS": "200"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"newsletter {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc
