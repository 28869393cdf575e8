"""Who runs the scheduler: exactly one process at a time, however many are started.

On PostgreSQL the leader holds a session-level advisory lock (``pg_try_advisory_lock``) on a
connection of its own. The database releases the lock the moment that connection ends, so a
leader that dies (crash, SIGKILL, lost machine) hands over without anyone cleaning up; the
others stand by and try again every few seconds. TCP keepalives on that connection make the
server notice a machine that vanished without closing its socket within about a minute,
instead of hours.

The lock key is derived from the schema, so deployments that share one database in separate
schemas (and the test suite) do not block each other.

On SQLite one process does it all and always leads; a lock file next to the database
keeps a second service process off it, since SQLite cannot make two claimers safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Protocol

from sqlalchemy import Connection, Engine, NullPool, text

from newsletter import db

log = logging.getLogger(__name__)

LOCK_NAME = "scheduler"
_CONNECT_ARGS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
# The server side of the same: it is the server that must notice a dead leader.
_SERVER_KEEPALIVES = (
    "SET tcp_keepalives_idle = 20",
    "SET tcp_keepalives_interval = 5",
    "SET tcp_keepalives_count = 4",
)


class Leadership(Protocol):
    @property
    def held(self) -> bool: ...

    def acquire(self) -> bool:
        """Try to become the leader; True if this process leads now. Never blocks long."""
        ...

    def check(self) -> bool:
        """Whether this process still leads (the lock's connection may have died)."""
        ...

    def release(self) -> None: ...


class SoloLeadership:
    """SQLite: a single process, which therefore always leads."""

    held = True

    def acquire(self) -> bool:
        return True

    def check(self) -> bool:
        return True

    def release(self) -> None:
        pass


def lock_key(schema: str, name: str = LOCK_NAME) -> int:
    """A signed 64-bit advisory lock key, stable across processes and versions."""
    digest = hashlib.blake2b(f"newsletter:{name}:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _schema_key(conn: Connection, name: str) -> int:
    schema = conn.execute(text("SELECT current_schema()")).scalar_one()
    return lock_key(str(schema), name)


class AdvisoryLockLeadership:
    """PostgreSQL: a session-level advisory lock held on a dedicated, unpooled connection."""

    def __init__(self, url: str, name: str = LOCK_NAME) -> None:
        self.name = name
        identity = f"newsletter {name} {socket.gethostname()}:{os.getpid()}"[:63]
        # NullPool: the connection is ours alone, and closing it really ends the session (and
        # with it the lock); a pooled connection would keep the lock alive in the pool.
        self._engine: Engine = db.make_engine(
            url,
            poolclass=NullPool,
            connect_args={**_CONNECT_ARGS, "application_name": identity},
        )
        self._conn: Connection | None = None
        self._key: int | None = None
        self._held = False
        self._unreachable = False  # said once per outage, not at every poll

    @property
    def held(self) -> bool:
        return self._held

    def _connect(self) -> Connection:
        if self._conn is None:
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            for statement in _SERVER_KEEPALIVES:
                conn.execute(text(statement))
            self._key = _schema_key(conn, self.name)
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        self._held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken: closing is only tidying up
                log.debug("closing the lock connection failed", exc_info=True)

    def acquire(self) -> bool:
        if self._held:
            return self.check()
        try:
            conn = self._connect()
            got = conn.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": self._key}
            ).scalar_one()
        except Exception as exc:
            if not self._unreachable:
                log.warning("cannot reach the database for the scheduler lock: %s", _first(exc))
            self._unreachable = True
            self._drop()
            return False
        self._unreachable = False
        self._held = bool(got)
        return self._held

    def check(self) -> bool:
        if not self._held or self._conn is None:
            return False
        try:
            still = self._conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND pid = pg_backend_pid() AND classid::bigint = :hi"
                    " AND objid::bigint = :lo AND objsubid = 1"
                ),
                _split(self._key),
            ).scalar_one()
        except Exception as exc:
            log.warning("lost the connection that holds the scheduler lock: %s", _first(exc))
            self._drop()
            return False
        if not still:
            self._drop()
        return self._held

    def release(self) -> None:
        if self._held and self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
            except Exception:
                log.debug("unlocking failed; closing the connection releases it", exc_info=True)
        self._drop()

    def close(self) -> None:
        self.release()
        self._engine.dispose()


class AlreadyRunning(RuntimeError):
    """Another service process uses this SQLite database."""


def sqlite_lock_path(engine: Engine) -> Path | None:
    database = engine.url.database
    if not db.is_sqlite(engine) or not database or database == ":memory:":
        return None
    return Path(database).expanduser().with_name(Path(database).name + ".service.lock")


def hold_sqlite(engine: Engine) -> IO[str] | None:
    """Make this the one service process on a SQLite database, for as long as it lives (the
    returned file must stay open; the OS drops the lock when the process ends, however it
    ends). Two would each claim the same rows: SQLite has no SKIP LOCKED."""
    path = sqlite_lock_path(engine)
    if path is None:
        return None
    import fcntl

    handle = open(path, "a+")  # noqa: SIM115 - held open for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise AlreadyRunning(
            f"{owner} is already running the service on this SQLite database; SQLite is for "
            "one process doing it all: to run several, use PostgreSQL"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{socket.gethostname()}:{os.getpid()}")
    handle.flush()
    return handle


def sqlite_holder(engine: Engine) -> str | None:
    """Who holds the SQLite service lock now (host:pid), or None."""
    path = sqlite_lock_path(engine)
    if path is None or not path.exists():
        return None
    import fcntl

    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "a process"
        return None


def leadership_for(engine: Engine, url: str) -> Leadership:
    if db.is_sqlite(engine):
        return SoloLeadership()
    return AdvisoryLockLeadership(url)


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    application: str
    client: str | None
    since: datetime | None


def lock_holder(engine: Engine, name: str = LOCK_NAME) -> Holder | None:
    """Which session holds the scheduler lock now (PostgreSQL), for `newsletter status`."""
    with engine.connect() as conn:
        key = _schema_key(conn, name)
        row = conn.execute(
            text(
                "SELECT a.pid, a.application_name, host(a.client_addr), a.backend_start"
                " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND l.classid::bigint = :hi AND l.objid::bigint = :lo AND l.objsubid = 1"
            ),
            _split(key),
        ).first()
    if row is None:
        return None
    return Holder(int(row[0]), str(row[1] or ""), row[2], row[3])


def _split(key: int | None) -> dict[str, int]:
    """pg_locks shows a bigint key as two unsigned 32-bit halves."""
    assert key is not None
    return {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF}


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
