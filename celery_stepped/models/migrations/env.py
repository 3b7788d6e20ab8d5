"""Alembic environment of celery_stepped: runs against the engine given in the config."""

from __future__ import annotations

from alembic import context

from celery_stepped.models import Base
from celery_stepped.models.migrations import VERSION_TABLE

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()
