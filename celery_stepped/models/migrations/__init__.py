"""Alembic migrations of the Stepped tables, applied by ``stepped migrate``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

__all__ = ["alembic_config", "upgrade"]

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
