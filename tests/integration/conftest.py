"""Fixtures of the integration suite: real ``celery worker`` processes on real Redis and SQL.

Each test module gets one :class:`Cluster` (module scope): a database of its own (a
SQLite file, or the run's PostgreSQL schema), a name of its own (``<run>-<module>``:
its lanes' namespace and the prefix of its broker and probe keys, see
:mod:`tests.isolation`), the test process's Stepped instance built by
:func:`tests.integration.worker_app.build`, and the worker subprocesses it started.
Workers are always stopped by the fixture's finalizer, also when a test fails; the
module's Redis keys are deleted then. Between tests the rows, the lanes and the probe
are emptied; the workers keep running.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from kombu.transport.redis import PrefixedStrictRedis
from sqlalchemy import delete, select

from celery_stepped.embedded import EmbeddedRedis, WorkerProcess
from celery_stepped.models import Achievement, Action, ParentLink, Step
from celery_stepped.statuses import FINAL_STATUSES
from tests.conftest import load_car, make_car, reset_database, stored_actions
from tests.integration import worker_app
from tests.isolation import RUN, delete_matching, delete_owned, prefix_pattern
from tests.models import Car

#: Queues some modules' workers consume besides ``stepped`` and ``celery``.
EXTRA_QUEUES = ("body",)
ROOT = Path(__file__).resolve().parents[2]
#: The Flask example (``examples/flask_app``): ``shop.py`` and ``run.py``.
SHOP = ROOT / "examples" / "flask_app"
#: How long a test waits for a tree before it fails.
WAIT = float(os.environ.get("STEPPED_TEST_WAIT", "60"))


class Cluster:
    """The test side of one module's workers: app, Stepped, probe and worker processes."""

    def __init__(
        self,
        redis_url: str,
        database_url: str,
        logs: Path,
        name: str,
        visibility_timeout: float | None = None,
        duplicate: bool = False,
        backend: bool = False,
    ) -> None:
        self.logs_dir = logs
        self.name = name
        self.broker_prefix = f"{name}:broker:"
        self.env = {
            worker_app.ENV_BROKER: redis_url,
            worker_app.ENV_LANES: redis_url,
            worker_app.ENV_DATABASE: database_url,
            worker_app.ENV_PROBE: redis_url,
            worker_app.ENV_NAME: name,
        }
        if visibility_timeout is not None:
            self.env[worker_app.ENV_VISIBILITY] = str(visibility_timeout)
        if duplicate:
            self.env[worker_app.ENV_DUPLICATE] = "1"
        if backend:
            self.env[worker_app.ENV_BACKEND] = redis_url
        self.app, self.stepped, self.probe = worker_app.build(
            self.env[worker_app.ENV_BROKER],
            self.env[worker_app.ENV_LANES],
            database_url,
            self.env[worker_app.ENV_PROBE],
            name,
            duplicate=duplicate,
            backend_url=self.env.get(worker_app.ENV_BACKEND),
        )
        #: The broker's Redis as the workers see it: every key prefixed like theirs.
        self.broker = PrefixedStrictRedis(
            connection_pool=redis.ConnectionPool.from_url(redis_url),
            global_keyprefix=self.broker_prefix,
        )
        self.started = 0
        self.workers: list[WorkerProcess] = []

    # -- workers -------------------------------------------------------------------------

    def start_worker(self, concurrency: int = 2, queues: str = "stepped,celery") -> WorkerProcess:
        """Start one more ``celery worker -Q <queues>`` process and wait until ready."""
        worker = WorkerProcess(
            "tests.integration.worker_app",
            queues=queues,
            concurrency=concurrency,
            env=self.env,
            cwd=str(ROOT),
            logfile=str(self.logs_dir / f"worker-{self.started}.log"),
        )
        self.started += 1
        self.workers.append(worker)
        worker.start()
        return worker

    def stop_workers(self) -> None:
        """Stop every worker this cluster started (SIGTERM, then SIGKILL)."""
        while self.workers:
            self.workers.pop().stop()

    def logs(self) -> str:
        """The tail of every worker's log (for failure messages)."""
        return "\n".join(w.read_log()[-3000:] for w in self.workers)

    def whole_logs(self) -> str:
        """Every worker's whole log (to count or parse lines; ``logs`` keeps tails)."""
        return "\n".join(w.read_log() for w in self.workers)

    def log_errors(self, allowed: tuple[str, ...] = ()) -> list[str]:
        """Error lines of every log this module's workers wrote, but handled exceptions
        (logged on purpose) and lines containing one of ``allowed``."""
        errors = []
        for path in sorted(self.logs_dir.glob("worker-*.log")):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if not any(level in line for level in ("ERROR/", "CRITICAL/", "Retry in")):
                    continue
                if "stepped handled" in line or any(a in line for a in allowed):
                    continue
                errors.append(line)
        return errors

    # -- state ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty the rows, the lanes and the probe (the workers keep running)."""
        with self.stepped.session() as s:
            for model in (ParentLink, Step, Achievement, Action, Car):
                s.execute(delete(model))
        self.stepped.lanes.clear()
        self.probe.flush()
        if worker_app.ENV_BACKEND in self.env:  # the results: this module's keys only
            delete_matching(self.stepped.redis, prefix_pattern(f"{self.name}:backend:"))

    def flush_broker(self) -> None:
        """The broker loses every message (this module's broker keys only)."""
        delete_matching(self.stepped.redis, prefix_pattern(self.broker_prefix))

    def make_car(self, **values: Any) -> Car:
        """Insert a car and return it detached."""
        return make_car(self.stepped, **values)

    def car(self, car_id: int) -> Car:
        """The car as stored now."""
        return load_car(self.stepped, car_id)

    def log_tokens(self, car_id: int) -> list[str]:
        """The tokens step bodies appended to the car's log, in order."""
        return [t for t in self.car(car_id).log.split(";") if t]

    def actions(self, name: str | None = None) -> list[Action]:
        """Every action (of ``name``), oldest first, detached."""
        return stored_actions(self.stepped, name)

    def steps_of(self, action_id: int) -> list[Step]:
        """The action's steps, detached."""
        return list(self.stepped.get_action(action_id).steps)

    # -- waiting -------------------------------------------------------------------------

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float = WAIT) -> Any:
        """Poll ``predicate`` until it returns something truthy; fail with the logs."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.05)

    def later(self, name: str, car: Car, *args: Any) -> int:
        """Start a root action through the broker; its id once the worker created it."""
        return self.root_of(self.stepped.registry.find(type(car), name).later(car, *args))

    def root_of(self, result: AsyncResult) -> int:
        """The id of the root action a ``later()`` call created."""

        def find() -> int | None:
            with self.stepped.session() as s:
                return s.scalar(select(Action.id).where(Action.request_id == result.id))

        return int(self.wait_for(f"root action of request {result.id}", find))

    def wait_final(self, action_id: int, timeout: float = WAIT) -> Action:
        """Wait until the action reached a final status and return it with its steps."""

        def final() -> Action | None:
            action = self.stepped.get_action(action_id)
            return action if action.status in FINAL_STATUSES else None

        return self.wait_for(f"action {action_id} to finish", final, timeout)

    def wait_status(self, action_id: int, status: str, timeout: float = WAIT) -> Action:
        """Wait until the action has ``status``."""

        def reached() -> Action | None:
            action = self.stepped.get_action(action_id)
            return action if action.status == status else None

        return self.wait_for(f"action {action_id} to be {status}", reached, timeout)

    def wait_ready(self, action_id: int) -> Action:
        """Wait until an outbound action ran all its steps and waits to be completed
        (``performing`` alone may mean its first step has not run yet)."""

        def ready() -> Action | None:
            action = self.stepped.get_action(action_id)
            steps = self.stepped.definition_for(action.actor_type, action.name)
            last = len(steps.steps_for_run()) - 1
            closed = [s for s in action.steps if s.definition_index == last]
            done = bool(closed) and closed[0].status == "succeeded"
            return action if action.status == "performing" and done else None

        return self.wait_for(f"outbound action {action_id} to be ready", ready)

    def wait_named(self, name: str, count: int = 1, status: str | None = None) -> list[Action]:
        """Wait until ``count`` actions named ``name`` exist (with ``status``)."""

        def found() -> list[Action] | None:
            rows = [a for a in self.actions(name) if status is None or a.status == status]
            return rows if len(rows) >= count else None

        return self.wait_for(f"{count} {name} action(s) {status or ''}", found)

    def quiet(self, seconds: float = 0.3) -> None:
        """Wait until no message is queued or being worked on (acks_late: a message
        stays unacknowledged while it runs, or while a worker holds it for its ETA)."""

        def idle() -> bool:
            queued = any(self.broker.llen(q) for q in ("stepped", "celery", *EXTRA_QUEUES))
            return not queued and not self.broker.hlen("unacked")

        self.wait_for("the workers to go idle", idle)
        time.sleep(seconds)
        self.wait_for("the workers to go idle", idle)

    def assert_signals_once(self, allowed_errors: tuple[str, ...] = ()) -> None:
        """Every step closed once and every action completed once, by the signals; no
        worker logged an error (a failed internal task, a retry, a locked database)."""
        assert self.log_errors(allowed_errors) == []
        counts = self.probe.counts()
        doubled = {
            k: v
            for k, v in counts.items()
            if k.startswith(("step_completed:", "action_completed:", "action_started:")) and v != 1
        }
        assert doubled == {}, f"signals sent more than once: {doubled}"
        with self.stepped.session() as s:
            steps = s.execute(select(Step.id, Step.status)).all()
            actions = s.execute(select(Action.id, Action.status)).all()
        for step_id, status in steps:
            if status in ("succeeded", "failed"):
                assert counts.get(f"step_completed:{step_id}") == 1, (step_id, status)
        for action_id, status in actions:
            if status in FINAL_STATUSES:
                assert counts.get(f"action_completed:{action_id}") == 1, (action_id, status)


def make_cluster(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_base: str,
    *,
    workers: int = 1,
    concurrency: int = 2,
    visibility_timeout: float | None = None,
    duplicate: bool = False,
    env: Mapping[str, str] | None = None,
    backend: bool = False,
) -> Cluster:
    """A module's cluster: a fresh database, Redis keys of its own, then the workers
    (with ``env`` added to their environment; ``backend=True``: with a Redis result
    backend, its keys prefixed ``<name>:backend:``).

    ``redis_base`` is unused (the run's Redis database comes from the ``redis_url``
    fixture); it stays for the modules that build their own cluster.
    """
    directory = tmp_path_factory.mktemp("integration")
    database_url = request.getfixturevalue("database_server")
    database_url = database_url or f"sqlite:///{directory / 'stepped.db'}"
    name = f"{RUN}-{request.module.__name__.rsplit('.', 1)[-1]}"
    cluster = Cluster(
        request.getfixturevalue("redis_url"),
        database_url,
        directory,
        name,
        visibility_timeout,
        duplicate,
        backend,
    )
    cluster.env.update(env or {})

    def finish() -> None:
        cluster.stop_workers()
        delete_owned(cluster.stepped.redis, name)
        cluster.stepped.redis.close()
        cluster.probe.redis.close()
        cluster.broker.close()
        cluster.stepped.engine.dispose()

    request.addfinalizer(finish)
    reset_database(cluster.stepped)
    for _ in range(workers):
        cluster.start_worker(concurrency)
    return cluster


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_base: str
) -> Cluster:
    """One worker process (two pool processes) for the module."""
    return make_cluster(request, tmp_path_factory, redis_base)


@pytest.fixture
def it(cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster, emptied before the test."""
    cluster.reset()
    yield cluster


#: The Redis databases the Flask example uses (fixed numbers: broker, lanes).
SHOP_DATABASES = (2, 3)


@pytest.fixture(scope="module")
def shop_redis() -> Iterator[str]:
    """A Redis server of the module's own for the Flask example: it uses fixed database
    numbers, which another run on a shared Redis server may be using."""
    with EmbeddedRedis() as server:
        yield server.url


@contextlib.contextmanager
def shop_module(env: Mapping[str, str]) -> Iterator[ModuleType]:
    """The Flask example's ``shop`` module, imported with ``env`` (``SHOP_REDIS_URL``: a
    Redis server of the test's own, see ``shop_redis``; ``SHOP_DATABASE_URL``, ...) and its
    tables created; its Redis databases (2: broker, 3: lanes) are flushed before and
    after, and its classes unmapped after."""
    base = env["SHOP_REDIS_URL"]
    for db in SHOP_DATABASES:
        redis.Redis.from_url(f"{base}/{db}").flushdb()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.syspath_prepend(str(SHOP))
        sys.modules.pop("shop", None)
        module = importlib.import_module("shop")
    module.create_tables()
    try:
        yield module
    finally:
        sys.modules.pop("shop", None)
        module.stepped.engine.dispose()
        # Unmap Order: the next import maps a new class of the same actor type name.
        module.ShopBase.registry.dispose()
        for db in SHOP_DATABASES:
            redis.Redis.from_url(f"{base}/{db}").flushdb()
