"""outbox entries keyed by the request they start

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 16:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stepped_outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_stepped_outbox_key"), ["key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("stepped_outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stepped_outbox_key"))
        batch_op.drop_column("key")
