"""Engine set-up that matters for speed as much as for correctness."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from newsletter import db

pytestmark = pytest.mark.postgres


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
