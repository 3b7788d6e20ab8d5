"""The SQL side: engine creation, SQLite pragmas, sessions, fork safety."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import signals as celery_signals
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

__all__ = ["Database", "configure_sqlite", "make_engine", "on_sqlite"]

_databases: weakref.WeakSet[Database] = weakref.WeakSet()


def configure_sqlite(engine: Engine) -> None:
    """WAL, a busy timeout and NORMAL sync: several worker processes on one file."""

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def on_sqlite(s: Session) -> bool:
    """Whether ``s`` talks to SQLite: no row locks, so a step body runs before Stepped
    writes (no write lock is held while it runs)."""
    return bool(s.get_bind().dialect.name == "sqlite")


def make_engine(database_url: str) -> Engine:
    """An engine for ``database_url``, tuned for SQLite when it is one."""
    if database_url.startswith("sqlite"):
        memory = database_url in ("sqlite://", "sqlite:///:memory:")
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 30, "check_same_thread": False}}
        if memory:
            kwargs["poolclass"] = StaticPool
        engine = create_engine(database_url, **kwargs)
        configure_sqlite(engine)
        return engine
    return create_engine(database_url, pool_pre_ping=True)


def _engine_of(session_factory: Callable[[], Session]) -> Engine:
    with session_factory() as session:
        bind = session.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine


class Database:
    """The Stepped tables' engine and sessions.

    Args:
        database_url: a SQLAlchemy URL (an engine is made for it), or
        engine: an engine, or
        session_factory: a callable returning sessions (its bind is the engine).
    """

    def __init__(
        self,
        database_url: str | None = None,
        engine: Engine | None = None,
        session_factory: Callable[[], Session] | None = None,
    ) -> None:
        if engine is not None and database_url is None and engine.dialect.name == "sqlite":
            configure_sqlite(engine)  # a user's SQLite engine: the pragmas workers need
        if session_factory is None:
            engine = engine or make_engine(str(database_url))
            session_factory = sessionmaker(engine, expire_on_commit=False)
        self.session_factory: Callable[[], Session] = session_factory
        self.engine: Engine = engine or _engine_of(session_factory)
        _databases.add(self)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session: commit on success, rollback on error, closed in any case."""
        session = self.session_factory()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose_after_fork(self) -> None:
        """Forget the connections inherited from a parent process (never close them)."""
        self.engine.dispose(close=False)


def _dispose_after_fork(**_: Any) -> None:
    """In a fresh pool process: never reuse the parent's database connections."""
    for database in list(_databases):
        database.dispose_after_fork()


celery_signals.worker_process_init.connect(_dispose_after_fork, weak=False)
