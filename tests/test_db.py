"""Engine set-up and bulk writes: there for speed, and they must not cost correctness."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from newsletter import db, digests

TRICKY = [
    "plain",
    'a "quoted" word',
    'back\\slash \\" and \\\\ pairs',
    "comma, {braces}, and spaces ",
    "",
    "NULL",
    "ünïcode ✓ 𝛼",
    json.dumps([{"keyword": 'say "hi" \\ bye', "title": True, "summary": None}]),
]


def test_bulk_inserts_keep_every_value_as_written(db_url: str) -> None:
    """`send` writes the ledger with driver-level inserts (on PostgreSQL, one array per
    column, put together by hand): quotes, backslashes, braces and the word NULL come back
    exactly as they went in, on both databases."""
    engine = db.make_engine(db_url)
    rows = [(n, value, n * 7) for n, value in enumerate(TRICKY)]
    try:
        with engine.begin() as conn:
            conn.execute(
                text("CREATE TABLE tricky (id integer PRIMARY KEY, label text, n integer)")
            )
            results = digests._insert_values(
                conn,
                "tricky",
                [("id", "integer"), ("label", "text"), ("n", "integer")],
                rows,
                "ON CONFLICT (id) DO NOTHING",
            )
            assert sum(r.rowcount for r in results) == len(rows)
            back = [
                tuple(r) for r in conn.execute(text("SELECT id, label, n FROM tricky ORDER BY id"))
            ]
        assert back == rows
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_plans_each_execution_for_the_table_as_it_is(pg_url: str) -> None:
    """A statement run often gets a generic plan costed on the table's size back then. The
    ledger grows from a few hundred rows (when autovacuum first analyses it) to 100,000 within
    one `send`, and such a plan of the outcome UPDATE scanned the whole table for every group
    of outcomes. `make_engine`'s connections plan each execution."""
    engine = db.make_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE grows (id integer PRIMARY KEY, note text)"))
            conn.execute(
                text("INSERT INTO grows SELECT g, repeat('n', 400) FROM generate_series(1, 150) g")
            )
            conn.execute(text("ANALYZE grows"))  # what autovacuum does early in a run
            conn.execute(
                text(
                    "PREPARE touch(integer, integer, integer, integer) AS "
                    "UPDATE grows SET note = 'x' WHERE id IN ($1, $2, $3, $4)"
                )
            )
            for _ in range(8):  # past the five custom plans before a generic one is kept
                conn.execute(text("EXECUTE touch(1, 2, 3, 4)"))
            conn.execute(
                text(
                    "INSERT INTO grows SELECT g, repeat('n', 400) "
                    "FROM generate_series(151, 50000) g"
                )
            )
            plan = "\n".join(conn.execute(text("EXPLAIN EXECUTE touch(40000, 3, 5, 7)")).scalars())
        assert "Index Scan" in plan and "Seq Scan" not in plan, plan
    finally:
        engine.dispose()
