"""index subscribers by confirmation time, for the console's 30-day growth chart

Without it the dashboard's "confirmed per day" read every subscriber row: ~0.2 s per page view
at a million subscribers, on a page an operator may keep open and reload.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_subscribers_confirmed_at", "subscribers", ["confirmed_at"])


def downgrade() -> None:
    op.drop_index("ix_subscribers_confirmed_at", table_name="subscribers")
