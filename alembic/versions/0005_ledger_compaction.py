"""ledger compaction: per-edition counts of compacted deliveries

Delivery rows of old editions are deleted in batches and counted into ``delivery_counts``;
deleting them sets ``subscriber_events.delivery_id`` to NULL, which needs an index.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("pending", "sending", "sent", "failed", "skipped")


def upgrade() -> None:
    op.create_table(
        "delivery_counts",
        sa.Column("digest_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "status",
            sa.Enum(*STATUSES, name="delivery_count_status", native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["digest_id"], ["digests.id"], name="fk_delivery_counts_digest_id_digests", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("digest_id", "status", name="pk_delivery_counts"),
    )
    with op.batch_alter_table("subscriber_events", schema=None) as batch_op:
        batch_op.create_index("ix_subscriber_events_delivery_id", ["delivery_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("subscriber_events", schema=None) as batch_op:
        batch_op.drop_index("ix_subscriber_events_delivery_id")
    op.drop_table("delivery_counts")
