"""start records: before runs once per start message

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 16:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stepped_starts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stepped_starts")),
        sa.UniqueConstraint("key", name=op.f("uq_stepped_starts_key")),
    )


def downgrade() -> None:
    op.drop_table("stepped_starts")
