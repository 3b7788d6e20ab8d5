"""Fixtures of the integration suite: real ``celery worker`` processes on real Redis and SQL.

Each test module gets one :class:`Cluster` (module scope): a database of its own (a
SQLite file, or ``STEPPED_DATABASE_URL``), the test process's Stepped instance built
by :func:`tests.integration.worker_app.build`, and the worker subprocesses it started.
Workers are always stopped by the fixture's finalizer, also when a test fails. Between
tests the rows, the lanes and the probe are emptied; the workers keep running.
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
from sqlalchemy import delete, select

from celery_stepped.embedded import WorkerProcess
from celery_stepped.models import Achievement, Action, ParentLink, Step
from celery_stepped.statuses import FINAL_STATUSES
from tests.conftest import (
    BROKER_DB,
    LANES_DB,
    load_car,
    make_car,
    reset_database,
    stored_actions,
)
from tests.integration import worker_app
from tests.models import Car

PROBE_DB = 4
ROOT = Path(__file__).resolve().parents[2]
#: The Flask example (``examples/flask_app``): ``shop.py`` and ``run.py``.
SHOP = ROOT / "examples" / "flask_app"
#: How long a test waits for a tree before it fails.
WAIT = float(os.environ.get("STEPPED_TEST_WAIT", "60"))


class Cluster:
    """The test side of one module's workers: app, Stepped, probe and worker processes."""

    def __init__(
        self,
        redis_base: str,
        database_url: str,
        logs: Path,
        visibility_timeout: float | None = None,
        duplicate: bool = False,
    ) -> None:
        self.logs_dir = logs
        self.env = {
            worker_app.ENV_BROKER: f"{redis_base}/{BROKER_DB}",
            worker_app.ENV_LANES: f"{redis_base}/{LANES_DB}",
            worker_app.ENV_DATABASE: database_url,
            worker_app.ENV_PROBE: f"{redis_base}/{PROBE_DB}",
        }
        if visibility_timeout is not None:
            self.env[worker_app.ENV_VISIBILITY] = str(visibility_timeout)
        if duplicate:
            self.env[worker_app.ENV_DUPLICATE] = "1"
        self.app, self.stepped, self.probe = worker_app.build(
            self.env[worker_app.ENV_BROKER],
            self.env[worker_app.ENV_LANES],
            database_url,
            self.env[worker_app.ENV_PROBE],
            duplicate=duplicate,
        )
        self.broker = redis.Redis.from_url(self.env[worker_app.ENV_BROKER])
        self.started = 0
        self.workers: list[WorkerProcess] = []

    # -- workers -------------------------------------------------------------------------

    def start_worker(self, concurrency: int = 2) -> WorkerProcess:
        """Start one more ``celery worker -Q stepped,celery`` process and wait until ready."""
        worker = WorkerProcess(
            "tests.integration.worker_app",
            queues="stepped,celery",
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
        self.stepped.redis.flushdb()
        self.probe.flush()

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
            queued = any(self.broker.llen(q) for q in ("stepped", "celery"))
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
) -> Cluster:
    """A module's cluster: fresh database and Redis databases, then the workers (with
    ``env`` added to their environment)."""
    directory = tmp_path_factory.mktemp("integration")
    database_url = os.environ.get("STEPPED_DATABASE_URL") or f"sqlite:///{directory / 'stepped.db'}"
    for db in (LANES_DB, BROKER_DB, PROBE_DB):
        redis.Redis.from_url(f"{redis_base}/{db}").flushdb()
    cluster = Cluster(redis_base, database_url, directory, visibility_timeout, duplicate)
    cluster.env.update(env or {})

    def finish() -> None:
        cluster.stop_workers()
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


@contextlib.contextmanager
def shop_module(env: Mapping[str, str]) -> Iterator[ModuleType]:
    """The Flask example's ``shop`` module, imported with ``env`` (``SHOP_REDIS_URL``,
    ``SHOP_DATABASE_URL``, ...) and its tables created; its Redis databases (0: broker,
    1: lanes) are flushed before and after, and its classes unmapped after."""
    base = env["SHOP_REDIS_URL"]
    for db in (0, 1):
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
        for db in (0, 1):
            redis.Redis.from_url(f"{base}/{db}").flushdb()
