"""dek usage

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dek_usage",
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("dek_id", sa.String(length=256), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_derived_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["key_id"], ["keys.id"], name=op.f("fk_dek_usage_key_id_keys")),
        sa.PrimaryKeyConstraint("key_id", "purpose", "dek_id", name=op.f("pk_dek_usage")),
    )
    with op.batch_alter_table("dek_usage", schema=None) as batch_op:
        batch_op.create_index("ix_dek_usage_key_id_version", ["key_id", "version"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("dek_usage", schema=None) as batch_op:
        batch_op.drop_index("ix_dek_usage_key_id_version")

    op.drop_table("dek_usage")
