"""delivery items: no foreign key to entries

PostgreSQL checked the key for every item written by locking the paper's row (FOR KEY SHARE).
The processes of `send` plan at once, each in its own transaction, and lock the same two
thousand papers again and again: at 100,000 readers that was a third of the server's CPU
(35 s → 23 s without it, same machine and data). Entries are only ever deleted with their feed,
and `ingest.remove_feed` now deletes their items itself, as the cascade did.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FK = "fk_delivery_items_entry_id_entries"


def upgrade() -> None:
    with op.batch_alter_table("delivery_items", schema=None) as batch_op:
        batch_op.drop_constraint(FK, type_="foreignkey")


def downgrade() -> None:
    # Items of entries deleted while the key was gone would break the key: remove them first.
    op.execute(
        "DELETE FROM delivery_items WHERE NOT EXISTS "
        "(SELECT 1 FROM entries WHERE entries.id = delivery_items.entry_id)"
    )
    with op.batch_alter_table("delivery_items", schema=None) as batch_op:
        batch_op.create_foreign_key(FK, "entries", ["entry_id"], ["id"], ondelete="CASCADE")
