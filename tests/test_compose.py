"""`newsletter send` plans each batch, writes it to the ledger claimed by itself and sends it
from memory (compose.planned_digest). A crash or a retry later reads the same digest back
from the ledger (compose.load_deliveries): both must be the very same email."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from conftest import ATOM_FIXTURE, RSS_FIXTURE, make_settings
from reliability.support import bulk_subscribers
from sqlalchemy import func, select

from newsletter import db, digests, ingest, subscribers
from newsletter.app import App
from newsletter.compose import Composer, load_deliveries, planned_digest, planned_papers
from newsletter.models import (
    Delivery,
    DeliveryItem,
    DeliveryStatus,
    Entry,
    Subscriber,
    utcnow,
)
from newsletter.render import Digest, Renderer
from newsletter.tokens import Signer

KEYWORDS = [
    ["diffusion"],
    ["equivariant", "symmetry"],
    ["Schrödinger bridge", "diffusion models"],
    ["quantum optimization", "Bayesian", "inverse problems"],
]


def _shown(digest: Digest) -> tuple[object, ...]:
    """Everything of a digest that reaches the email but the signed links (they carry the
    time they were made)."""
    return (
        digest.to,
        digest.period,
        digest.day,
        digest.message_id,
        [
            (
                item.paper.title,
                item.paper.link,
                item.paper.summary,
                item.paper.published,
                item.paper.authors,
                item.paper.source,
                item.hits,
            )
            for item in digest.items
        ],
    )


def test_digests_sent_from_memory_are_the_ones_the_ledger_holds(db_url: str) -> None:
    app = App(make_settings(db_url, 25))
    app.init()
    try:
        with db.transaction(app.sessions) as session:
            ingest.add_feed(session, str(RSS_FIXTURE))
        (report,) = ingest.fetch_all(app)
        assert report.ok
        emails = [f"reader{i:03d}@example.org" for i in range(40)]
        bulk_subscribers(app, emails, lambda i, _: KEYWORDS[i % len(KEYWORDS)], max_items=5)
        claim = digests.Claim("test-host:1:1", timedelta(minutes=5))
        planned = digests.PlanReport()
        batches = list(
            digests.iter_plan(
                app.sessions,
                utcnow(),
                planned,
                window=timedelta(days=36500),
                domain="example.org",
                ranges=[(1, 20), (20, 10_000)],
                claim=claim,
            )
        )
        assert planned.planned == 40 and len(batches) == 2
        assert all(batch.exact for batch in batches)
        with app.session() as session:
            rows = session.execute(select(Delivery.status, Delivery.claimed_by)).all()
        assert set(rows) == {(DeliveryStatus.SENDING, claim.worker)}, "written claimed"

        renderer = Renderer(app.settings)
        now = utcnow()
        for batch in batches:
            ids = [row.delivery_id for row in batch.rows]
            with app.session() as session:
                composer = Composer(renderer, Signer(app.secret_key))
                composer.read_papers(session, planned_papers(batch.rows))
                memory = [(r.delivery_id, planned_digest(composer, r, now)) for r in batch.rows]
                ledger = load_deliveries(
                    session, Composer(renderer, Signer(app.secret_key)), ids, now
                )
            assert [d for d, _ in memory] == [d for d, _ in ledger] == sorted(ids)
            assert [_shown(d) for _, d in memory] == [_shown(d) for _, d in ledger]
            assert all(len(d.items) > 0 for _, d in memory)
    finally:
        app.close()


def test_a_plan_the_ledger_does_not_hold_whole_is_read_back(db_url: str) -> None:
    """Should another planner have given a reader one of the papers first (its item row is
    already there), the batch is not `exact` and the sender reads it from the ledger."""
    app = App(make_settings(db_url, 25))
    app.init()
    try:
        with db.transaction(app.sessions) as session:
            ingest.add_feed(session, str(RSS_FIXTURE))
        ingest.fetch_all(app)
        bulk_subscribers(app, ["ada@example.org"], lambda i, _: ["diffusion"], max_items=3)
        now = utcnow()
        with app.session() as session:
            index, _ = digests.load_index(session, now, timedelta(days=36500))
            readers = [
                digests.Reader(*row) for row in session.execute(select(*digests.READER_COLUMNS))
            ]
            (plan,) = digests.plan_batch(session, index, readers, now)
        assert len(plan.picks) == 3
        earlier = digests.PlannedDigest(
            plan.subscriber_id, plan.email, "2000-01-01", plan.picks[:1]
        )
        with db.transaction(app.sessions) as session:
            first = digests.write_plan(session, [earlier], "example.org")
        assert first.exact and len(first.rows) == 1
        with db.transaction(app.sessions) as session:
            second = digests.write_plan(session, [plan], "example.org")
        assert len(second.rows) == 1 and not second.exact, "one of its items was there already"
        with app.session() as session:
            ((_, digest),) = load_deliveries(
                session,
                Composer(Renderer(app.settings), Signer(app.secret_key)),
                [second.rows[0].delivery_id],
                now,
            )
        assert len(digest.items) == 2, "the ledger, not the plan, says what is sent"
    finally:
        app.close()


def test_deleting_a_subscriber_deletes_their_ledger_rows(db_url: str) -> None:
    """Items have no foreign keys (migrations 0003-0005): `subscribers.remove` deletes a
    subscriber's items itself, the database their deliveries, and nobody else's, on both
    databases. A delivery deleted through the ORM takes its items too."""
    app = App(make_settings(db_url, 25))
    app.init()
    try:
        with db.transaction(app.sessions) as session:
            ingest.add_feed(session, str(RSS_FIXTURE))
        ingest.fetch_all(app)
        bulk_subscribers(
            app,
            ["ada@example.org", "bob@example.org", "cy@example.org"],
            lambda i, _: ["diffusion"],
        )
        digests.plan_period(
            app.sessions, utcnow(), window=timedelta(days=36500), domain="example.org"
        )

        def rows() -> dict[str, tuple[int, int]]:
            """Per address: (deliveries, items), by the items' own columns."""
            with app.session() as session:
                emails = dict(session.execute(select(Subscriber.id, Subscriber.email)).all())
                owners = session.execute(select(Delivery.id, Delivery.subscriber_id)).all()
                items = session.execute(
                    select(DeliveryItem.subscriber_id, DeliveryItem.delivery_id)
                ).all()
            found: dict[str, tuple[int, int]] = {}
            delivery_ids = {did for did, _ in owners}
            for sid in {s for _, s in owners} | {s for s, _ in items}:
                mine = [d for s, d in items if s == sid]
                assert set(mine) <= delivery_ids, "no item outlives its delivery"
                found[emails.get(sid, f"deleted #{sid}")] = (
                    sum(1 for _, s in owners if s == sid),
                    len(mine),
                )
            return found

        before = rows()
        assert set(before) == {"ada@example.org", "bob@example.org", "cy@example.org"}
        assert all(d == 1 and i > 0 for d, i in before.values()), before
        with db.transaction(app.sessions) as session:
            removed = subscribers.remove(session, " Ada@Example.org ")
            assert removed is not None and removed.email == "ada@example.org"
            assert subscribers.remove(session, "nobody@example.org") is None
        after = rows()
        assert after == {k: v for k, v in before.items() if k != "ada@example.org"}

        with db.transaction(app.sessions) as session:
            bob = session.scalar(
                select(Delivery).join(Subscriber).where(Subscriber.email == "bob@example.org")
            )
            assert bob is not None and len(bob.items) == before["bob@example.org"][1]
            session.delete(bob)
        assert rows() == {"cy@example.org": before["cy@example.org"]}
    finally:
        app.close()


@pytest.mark.postgres
def test_removing_a_subscriber_while_a_send_writes_their_digest_leaves_no_item(
    pg_url: str,
) -> None:
    """`subscribers.remove` racing a planner's transaction on PostgreSQL (SQLite has one
    writer at a time). The planner has written a delivery and its items, not yet committed.
    Deleting the subscriber waits for it; the items deleted after that include the new ones.
    Deleting items first saw none, and left them behind when the cascade took the delivery."""
    app = App(make_settings(pg_url, 25))
    app.init()
    try:
        bulk_subscribers(app, ["ada@example.org"], lambda i, _: ["diffusion"])
        with app.session() as session:
            ada_id = session.scalar(select(Subscriber.id))
        assert ada_id is not None
        planner = app.session()
        planner.add(
            Delivery(
                subscriber_id=ada_id,
                period="2026-11-30",
                message_id="<race@example.org>",
                items=[
                    DeliveryItem(subscriber_id=ada_id, entry_id=entry, rank=entry, hits=[])
                    for entry in (1, 2)
                ],
            )
        )
        planner.flush()  # written, locks held, not committed

        errors: list[BaseException] = []

        def remove() -> None:
            try:
                with db.transaction(app.sessions) as session:
                    subscribers.remove(session, "ada@example.org")
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        remover = threading.Thread(target=remove)
        remover.start()
        remover.join(0.5)
        assert remover.is_alive(), "the delete waits for the digest being written"
        planner.commit()
        planner.close()
        remover.join(10)
        assert not remover.is_alive() and errors == []
        with app.session() as session:
            assert session.scalar(select(func.count()).select_from(Delivery)) == 0
            assert session.scalar(select(func.count()).select_from(DeliveryItem)) == 0
    finally:
        app.close()


def test_removing_a_feed_deletes_its_papers_from_digests(db_url: str) -> None:
    """Items have no key to entries (migration 0004): `remove_feed` deletes the items of its
    entries itself, and only those, on both databases; the deliveries stay in the ledger."""
    app = App(make_settings(db_url, 25))
    app.init()
    try:
        with db.transaction(app.sessions) as session:
            kept = ingest.add_feed(session, str(RSS_FIXTURE)).id
            gone = ingest.add_feed(session, str(ATOM_FIXTURE)).id
        ingest.fetch_all(app)
        bulk_subscribers(
            app, ["ada@example.org", "bob@example.org"], lambda i, _: ["diffusion", "learning"]
        )
        digests.plan_period(
            app.sessions, utcnow(), window=timedelta(days=36500), domain="example.org"
        )

        def items_by_feed() -> dict[int, int]:
            with app.session() as session:
                rows = session.execute(
                    select(Entry.feed_id, func.count())
                    .select_from(DeliveryItem)
                    .join(Entry, Entry.id == DeliveryItem.entry_id)
                    .group_by(Entry.feed_id)
                )
                return {feed_id: count for feed_id, count in rows}

        before = items_by_feed()
        assert before.get(kept, 0) > 0 and before.get(gone, 0) > 0, before
        with app.session() as session:
            deliveries = session.scalar(select(func.count()).select_from(Delivery))
        with db.transaction(app.sessions) as session:
            assert ingest.remove_feed(session, str(gone)) is not None
        with app.session() as session:
            items = session.scalar(select(func.count()).select_from(DeliveryItem))
            assert session.scalar(select(func.count()).select_from(Delivery)) == deliveries
        assert items == before[kept], "only the removed feed's items went, none left dangling"
        assert items_by_feed() == {kept: before[kept]}
    finally:
        app.close()
