"""partial index on sent deliveries

The (status, sent_at) index let the planner serve `status = 'pending'` from it, reading every
open row of an edition for each claim; a partial index on sent rows serves the complaint-rate
count and nothing else.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_status_sent_at")
        batch_op.create_index(
            "ix_deliveries_sent_at",
            ["sent_at"],
            unique=False,
            postgresql_where=sa.text("status = 'sent'"),
            sqlite_where=sa.text("status = 'sent'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_sent_at")
        batch_op.create_index("ix_deliveries_status_sent_at", ["status", "sent_at"], unique=False)
