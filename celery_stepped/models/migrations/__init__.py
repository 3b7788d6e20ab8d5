"""Alembic migrations of the Stepped tables, applied by ``stepped migrate``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

__all__ = ["alembic_config", "current_revision", "revisions", "stamp", "upgrade"]

VERSION_TABLE = "stepped_alembic_version"


def alembic_config(engine: Engine) -> Config:
    """An Alembic config pointing at the shipped scripts and at ``engine``."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations up to ``revision``."""
    command.upgrade(alembic_config(engine), revision)


def stamp(engine: Engine) -> None:
    """Record the head revision on a database whose tables ``create_all`` just made.

    A database that already records a revision is left alone: ``migrate`` takes it on
    from there.
    """
    if current_revision(engine) is None:
        command.stamp(alembic_config(engine), "head")


def current_revision(engine: Engine) -> str | None:
    """The revision the database records, or None (never migrated nor stamped)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def revisions() -> list[str]:
    """The shipped revisions, oldest first."""
    script = ScriptDirectory(str(Path(__file__).parent))
    return [r.revision for r in reversed(list(script.walk_revisions()))]
