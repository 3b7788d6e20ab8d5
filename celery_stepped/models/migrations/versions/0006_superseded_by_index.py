"""index on the superseder of an action

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 18:10:00

A superseded action keeps its parent links; the completion of its superseder finds them
through ``superseded_by_id`` (a recursive query), so that column is indexed.
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stepped_actions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_stepped_actions_superseded_by_id"), ["superseded_by_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("stepped_actions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stepped_actions_superseded_by_id"))
