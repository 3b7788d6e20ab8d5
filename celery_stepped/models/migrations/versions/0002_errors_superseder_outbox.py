"""stored errors, superseder, outbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 15:05:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stepped_actions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("error", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("superseded_by_id", sa.Integer(), nullable=True))
    with op.batch_alter_table("stepped_steps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("error", sa.JSON(), nullable=True))
    op.create_table(
        "stepped_outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("message", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stepped_outbox")),
    )


def downgrade() -> None:
    op.drop_table("stepped_outbox")
    with op.batch_alter_table("stepped_steps", schema=None) as batch_op:
        batch_op.drop_column("error")
    with op.batch_alter_table("stepped_actions", schema=None) as batch_op:
        batch_op.drop_column("superseded_by_id")
        batch_op.drop_column("error")
