"""delivery items: no foreign key to deliveries

The last key on the table: PostgreSQL checked it for every item written (ten per digest) by
locking the delivery's row, which the same transaction had only just inserted. At 10,000
readers that was 0.35 s of a 6.9 s `send` (three alternating pairs, same machine and data).
Items are written only together with their delivery (`digests.write_plan`, one transaction),
and deliveries are deleted only with their subscriber: `subscribers.remove` deletes the
subscriber's items itself, as the cascade did. So subscribers must be deleted through it
(`newsletter subscribers remove`), not with SQL: SQLite may give a deleted subscriber's id to
the next one, who would inherit the items left behind as papers already sent.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FK = "fk_delivery_items_delivery_id_deliveries"


def upgrade() -> None:
    with op.batch_alter_table("delivery_items", schema=None) as batch_op:
        batch_op.drop_constraint(FK, type_="foreignkey")


def downgrade() -> None:
    # Items whose delivery went while the key was gone would break the key: remove them first
    # (NOT EXISTS is an anti-join; PostgreSQL planned NOT IN as every item against every
    # delivery, which a month of a large list turns into hours).
    op.execute(
        "DELETE FROM delivery_items WHERE NOT EXISTS "
        "(SELECT 1 FROM deliveries WHERE deliveries.id = delivery_items.delivery_id)"
    )
    with op.batch_alter_table("delivery_items", schema=None) as batch_op:
        batch_op.create_foreign_key(FK, "deliveries", ["delivery_id"], ["id"], ondelete="CASCADE")
