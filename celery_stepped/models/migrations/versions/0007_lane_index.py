"""one index on an action's lane and status

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 10:10:00

Starting an action asks whether another action performs under its concurrency key (a
lane Redis lost is rebuilt from that). With one index on the key and one on the status,
SQLite chose the status index, which made the question a scan of every performing
action. One index on (concurrency_key, status) answers it with a probe, and serves the
queries by key alone that the index on the key served.
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stepped_actions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stepped_actions_concurrency_key"))
        batch_op.create_index(
            "ix_stepped_actions_lane", ["concurrency_key", "status"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("stepped_actions", schema=None) as batch_op:
        batch_op.drop_index("ix_stepped_actions_lane")
        batch_op.create_index(
            batch_op.f("ix_stepped_actions_concurrency_key"), ["concurrency_key"], unique=False
        )
