"""What to do about the errors a person can fix: one line instead of a traceback.

:func:`diagnose` turns an exception raised while reading or operating Stepped into a
sentence that says what is wrong and what to run: the tables are missing or behind
the code, the database or Redis cannot be reached (URLs named, passwords masked). The
command line prints it (``Error: ...``, exit code 1); a web page can show it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis import Redis

    from .extension import Stepped

__all__ = ["diagnose", "redis_url"]

TABLE = "stepped_actions"


def redis_url(client: Redis) -> str:
    """The URL of a Redis client's server, its password shown as ``***``."""
    from redis.connection import SSLConnection

    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    db = kwargs.get("db", 0)
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={db}"
    scheme = "rediss" if issubclass(pool.connection_class, SSLConnection) else "redis"
    user, password = kwargs.get("username") or "", kwargs.get("password")
    auth = f"{user}:***@" if password else (f"{user}@" if user else "")
    return f"{scheme}://{auth}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _sql_problem(stepped: Stepped, app_name: str) -> str | None:
    from sqlalchemy import inspect
    from sqlalchemy.exc import DBAPIError

    from .models.migrations import current_revision, revisions

    url = stepped.engine.url.render_as_string(hide_password=True)
    migrate = f"run `celery -A {app_name} stepped migrate`"
    try:
        has_tables = inspect(stepped.engine).has_table(TABLE)
        current = current_revision(stepped.engine) if has_tables else None
    except DBAPIError as unreachable:
        return f"cannot reach the database {url}: {_first_line(unreachable.orig or unreachable)}"
    if not has_tables:
        return f"the Stepped tables are missing in {url}: {migrate}"
    head = revisions()[-1]
    if current is not None and current != head:
        return f"the Stepped tables of {url} are at revision {current}, not {head}: {migrate}"
    return None


def diagnose(stepped: Stepped, exc: BaseException, *, app_name: str = "app") -> str | None:
    """One line saying what is wrong and what to do, or None for any other error.

    Args:
        stepped: the instance whose database and Redis were in use.
        exc: the exception raised.
        app_name: the ``-A`` value to name in the ``stepped migrate`` command.
    """
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return f"cannot reach Redis at {redis_url(stepped.redis)}: {_first_line(exc)}"
    if isinstance(exc, DBAPIError):
        return _sql_problem(stepped, app_name)
    return None
