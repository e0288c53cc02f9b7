"""consent state: complained status, suppression hashes, latched sending pause

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = ("pending", "active", "unsubscribed", "bounced")
NEW = (*OLD, "complained")


def _status(values: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(*values, name="subscriber_status", native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("complained_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.alter_column("status", existing_type=_status(OLD), type_=_status(NEW), existing_nullable=False)
    op.create_table(
        "suppressions",
        sa.Column("address_hash", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("address_hash", name=op.f("pk_suppressions")),
    )
    op.create_table(
        "send_pauses",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resumed_by", sa.String(length=254), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_send_pauses")),
    )


def downgrade() -> None:
    op.drop_table("send_pauses")
    op.drop_table("suppressions")
    op.execute("UPDATE subscribers SET status = 'unsubscribed' WHERE status = 'complained'")
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.alter_column("status", existing_type=_status(NEW), type_=_status(OLD), existing_nullable=False)
        batch_op.drop_column("complained_at")
