"""monthly digests: a third frequency and edition kind

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FREQUENCIES = ("daily", "weekly", "paused")
KINDS = ("daily", "weekly")


def _enum(values: tuple[str, ...], name: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    # Batch mode: SQLite rebuilds the table to change a CHECK constraint.
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.alter_column(
            "frequency",
            existing_type=_enum(FREQUENCIES, "frequency"),
            type_=_enum((*FREQUENCIES, "monthly"), "frequency"),
            existing_nullable=False,
        )
    with op.batch_alter_table("digests", schema=None) as batch_op:
        batch_op.alter_column(
            "kind",
            existing_type=_enum(KINDS, "digest_kind"),
            type_=_enum((*KINDS, "monthly"), "digest_kind"),
            existing_nullable=False,
        )


def downgrade() -> None:
    op.execute("UPDATE subscribers SET frequency = 'weekly' WHERE frequency = 'monthly'")
    op.execute("DELETE FROM digests WHERE kind = 'monthly'")
    with op.batch_alter_table("digests", schema=None) as batch_op:
        batch_op.alter_column(
            "kind",
            existing_type=_enum((*KINDS, "monthly"), "digest_kind"),
            type_=_enum(KINDS, "digest_kind"),
            existing_nullable=False,
        )
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.alter_column(
            "frequency",
            existing_type=_enum((*FREQUENCIES, "monthly"), "frequency"),
            type_=_enum(FREQUENCIES, "frequency"),
            existing_nullable=False,
        )
