"""delivery items: no foreign key to subscribers of their own

An item's subscriber is its delivery's, and deleting a subscriber already deletes their
deliveries and, through those, their items: the item's own key to subscribers only made
PostgreSQL check it for every item written (ten per digest), a sixth of its work in a send.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FK = "fk_delivery_items_subscriber_id_subscribers"


def upgrade() -> None:
    with op.batch_alter_table("delivery_items", schema=None) as batch_op:
        batch_op.drop_constraint(FK, type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("delivery_items", schema=None) as batch_op:
        batch_op.create_foreign_key(
            FK, "subscribers", ["subscriber_id"], ["id"], ondelete="CASCADE"
        )
