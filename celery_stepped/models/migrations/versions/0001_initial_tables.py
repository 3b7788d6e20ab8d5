"""initial tables

Revision ID: 0001
Revises:
Create Date: 2026-11-29 00:22:23.945220
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "stepped_achievements",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("checksum_key", sa.String(length=1024), nullable=False),
        sa.Column("checksum", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stepped_achievements")),
        sa.UniqueConstraint("checksum_key", name=op.f("uq_stepped_achievements_checksum_key")),
    )
    op.create_table(
        "stepped_actions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("actor_type", sa.String(length=255), nullable=False),
        sa.Column("actor_id", sa.String(length=255), nullable=False),
        sa.Column("arguments", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("root", sa.Boolean(), nullable=False),
        sa.Column("outbound", sa.Boolean(), nullable=False),
        sa.Column("concurrency_key", sa.String(length=1024), nullable=False),
        sa.Column("checksum", sa.String(length=64), nullable=True),
        sa.Column("checksum_key", sa.String(length=1024), nullable=False),
        sa.Column("current_step_index", sa.Integer(), nullable=False),
        sa.Column("timeout_seconds", sa.Float(), nullable=True),
        sa.Column("job", sa.String(length=255), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("after_callbacks_succeeded_count", sa.Integer(), nullable=False),
        sa.Column("after_callbacks_failed_count", sa.Integer(), nullable=False),
        sa.Column("ancestry", sa.Text(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stepped_actions")),
        sa.UniqueConstraint("request_id", name=op.f("uq_stepped_actions_request_id")),
    )
    with op.batch_alter_table("stepped_actions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_stepped_actions_concurrency_key"), ["concurrency_key"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_stepped_actions_name"), ["name"], unique=False)
        batch_op.create_index(batch_op.f("ix_stepped_actions_status"), ["status"], unique=False)

    op.create_table(
        "stepped_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action_id", sa.Integer(), nullable=False),
        sa.Column("definition_index", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("pending_actions_count", sa.Integer(), nullable=False),
        sa.Column("unsuccessful_actions_count", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["action_id"],
            ["stepped_actions.id"],
            name=op.f("fk_stepped_steps_action_id_stepped_actions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stepped_steps")),
        sa.UniqueConstraint(
            "action_id", "definition_index", name=op.f("uq_stepped_steps_action_id")
        ),
    )
    with op.batch_alter_table("stepped_steps", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_stepped_steps_action_id"), ["action_id"], unique=False)

    op.create_table(
        "stepped_parent_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("action_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("call", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["action_id"],
            ["stepped_actions.id"],
            name=op.f("fk_stepped_parent_links_action_id_stepped_actions"),
        ),
        sa.ForeignKeyConstraint(
            ["step_id"],
            ["stepped_steps.id"],
            name=op.f("fk_stepped_parent_links_step_id_stepped_steps"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stepped_parent_links")),
    )
    with op.batch_alter_table("stepped_parent_links", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_stepped_parent_links_action_id"), ["action_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_stepped_parent_links_step_id"), ["step_id"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("stepped_parent_links", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stepped_parent_links_step_id"))
        batch_op.drop_index(batch_op.f("ix_stepped_parent_links_action_id"))

    op.drop_table("stepped_parent_links")
    with op.batch_alter_table("stepped_steps", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stepped_steps_action_id"))

    op.drop_table("stepped_steps")
    with op.batch_alter_table("stepped_actions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stepped_actions_status"))
        batch_op.drop_index(batch_op.f("ix_stepped_actions_name"))
        batch_op.drop_index(batch_op.f("ix_stepped_actions_concurrency_key"))

    op.drop_table("stepped_actions")
    op.drop_table("stepped_achievements")
