"""The benchmark's Celery app: plain tasks, stepped actions and the counters.

Imported by the runner (``python -m benchmarks.run``), by the worker processes it
starts (``celery -A benchmarks.bench_app worker``) and by the eager child
(``benchmarks/eager.py``). It is configured from the environment:

- ``BENCH_REDIS_URL``: Redis database of the broker, the result backend and the lanes;
- ``BENCH_METRICS_URL``: a second Redis where each worker process adds its counters
  (kept apart so that the counters never show in the measured Redis's statistics);
- ``BENCH_DATABASE_URL``: SQLAlchemy URL of the Stepped tables and of ``Car``;
- ``BENCH_STEPS``: steps of the sequential actions (scenario 3, default 200);
- ``BENCH_EAGER``: ``1`` for eager mode (scenario 5).

Every worker process counts SQL statements and commits (SQLAlchemy engine events
installed by a ``worker_process_init`` receiver) and tasks received (``task_prerun``),
and after each task adds what changed to the hash ``bench:counts`` of the metrics Redis.
"""

from __future__ import annotations

import cProfile
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery, group, signals
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_stepped import Stepped

ENV_REDIS, ENV_METRICS = "BENCH_REDIS_URL", "BENCH_METRICS_URL"
ENV_DATABASE, ENV_STEPS, ENV_EAGER = "BENCH_DATABASE_URL", "BENCH_STEPS", "BENCH_EAGER"
#: The metrics hash every process adds its counters to.
COUNTS_KEY = "bench:counts"
#: This process's counters: ``statements``, ``commits``, ``rows`` (written), ``tasks``.
COUNTS: Counter[str] = Counter()
#: Stack depth of the tree's step bodies in eager mode: level -> [lowest, highest].
DEPTHS: dict[str, list[int]] = {}


class BenchBase(DeclarativeBase):
    """Declarative base of the benchmark's own table."""


class Car(BenchBase):
    """The actor of every stepped action here (one row per root)."""

    __tablename__ = "bench_cars"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(default="")


@dataclass(frozen=True)
class Config:
    """Where the app's stores are and how it runs."""

    redis_url: str
    database_url: str
    metrics_url: str = ""
    steps: int = 200
    eager: bool = False

    @classmethod
    def from_env(cls) -> Config | None:
        """The configuration in ``BENCH_*`` variables, or None when there is none."""
        if ENV_REDIS not in os.environ:
            return None
        return cls(
            redis_url=os.environ[ENV_REDIS],
            database_url=os.environ[ENV_DATABASE],
            metrics_url=os.environ.get(ENV_METRICS, ""),
            steps=int(os.environ.get(ENV_STEPS, "200")),
            eager=os.environ.get(ENV_EAGER) == "1",
        )

    def env(self) -> dict[str, str]:
        """The ``BENCH_*`` variables that rebuild this configuration in a subprocess."""
        return {
            ENV_REDIS: self.redis_url,
            ENV_DATABASE: self.database_url,
            ENV_METRICS: self.metrics_url,
            ENV_STEPS: str(self.steps),
            ENV_EAGER: "1" if self.eager else "0",
        }


@dataclass
class Bench:
    """The built app: Celery, Stepped, the engine, plain tasks and stepped actions."""

    config: Config
    app: Celery
    stepped: Stepped
    engine: Engine
    tasks: dict[str, Any] = field(default_factory=dict)
    actions: dict[str, Any] = field(default_factory=dict)


# -- counters ---------------------------------------------------------------------------


def _count_statement(*_: Any) -> None:
    COUNTS["statements"] += 1


def _count_commit(*_: Any) -> None:
    COUNTS["commits"] += 1


def _count_rows(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
    if statement.lstrip()[:6].upper() in _WRITES and cursor.rowcount > 0:
        COUNTS["rows"] += cursor.rowcount


_WRITES = {"INSERT", "UPDATE", "DELETE"}


def install_sql_counters(engine: Engine) -> None:
    """Count statements, commits and rows written that this process sends via ``engine``."""
    if not event.contains(engine, "before_cursor_execute", _count_statement):
        event.listen(engine, "before_cursor_execute", _count_statement)
        event.listen(engine, "after_cursor_execute", _count_rows)
        event.listen(engine, "commit", _count_commit)


class _Flusher:
    """Adds this process's new counts to the metrics hash (one pipeline per call)."""

    def __init__(self) -> None:
        self.pid = 0
        self.client: redis.Redis | None = None
        self.flushed: Counter[str] = Counter()

    def flush(self) -> None:
        """Add what changed since the last flush (nothing without a metrics Redis)."""
        if BENCH is None or not BENCH.config.metrics_url:
            return
        if self.pid != os.getpid():  # a fresh pool process: its own connection, no debt
            self.pid, self.client = os.getpid(), redis.Redis.from_url(BENCH.config.metrics_url)
        delta = COUNTS - self.flushed
        if not delta or self.client is None:
            return
        pipe = self.client.pipeline(transaction=False)
        for name, value in delta.items():
            pipe.hincrby(COUNTS_KEY, name, value)
        pipe.execute()
        self.flushed.update(delta)


_flusher = _Flusher()


@signals.worker_process_init.connect(weak=False)
def _on_process_init(**_: Any) -> None:
    """In each pool process: count SQL, starting from zero."""
    COUNTS.clear()
    _flusher.flushed.clear()
    if BENCH is not None:
        install_sql_counters(BENCH.engine)


@signals.task_prerun.connect(weak=False)
def _on_prerun(**_: Any) -> None:
    COUNTS["tasks"] += 1


@signals.task_postrun.connect(weak=False)
def _on_postrun(**_: Any) -> None:
    _flusher.flush()


@signals.worker_process_shutdown.connect(weak=False)
def _on_process_shutdown(**_: Any) -> None:
    _flusher.flush()
    if _PROFILE["profile"] is not None:
        _PROFILE["profile"].disable()
        _PROFILE["profile"].dump_stats(f"{os.environ[ENV_PROFILE]}/worker-{os.getpid()}.prof")


#: ``BENCH_PROFILE=<directory>``: each pool process runs under cProfile and writes
#: ``worker-<pid>.prof`` there when it exits (a diagnosis aid; it slows the worker).
ENV_PROFILE = "BENCH_PROFILE"
_PROFILE: dict[str, cProfile.Profile | None] = {"profile": None}


@signals.worker_process_init.connect(weak=False)
def _start_profile(**_: Any) -> None:
    if os.environ.get(ENV_PROFILE):
        profile = _PROFILE["profile"] = cProfile.Profile()
        profile.enable()


def stack_depth() -> int:
    """Frames on the caller's stack."""
    frame, depth = sys._getframe(1), 0
    while frame is not None:
        depth, frame = depth + 1, frame.f_back  # type: ignore[assignment]
    return depth


def record_depth(level: str) -> None:
    """Remember the lowest and highest stack depth seen at ``level`` (eager only)."""
    if BENCH is None or not BENCH.config.eager:
        return
    depth = stack_depth()
    seen = DEPTHS.setdefault(level, [depth, depth])
    seen[0], seen[1] = min(seen[0], depth), max(seen[1], depth)


# -- the app ----------------------------------------------------------------------------


def make_engine(database_url: str) -> Engine:
    """The engine Stepped and ``Car`` share (Stepped adds its SQLite pragmas)."""
    if database_url.startswith("sqlite"):
        return create_engine(database_url, connect_args={"timeout": 30})
    return create_engine(database_url, pool_pre_ping=True)


def build(config: Config) -> Bench:
    """The Celery app with its result backend, Stepped, the tasks and the actions."""
    app = Celery("bench", broker=config.redis_url, backend=config.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_expires=3600,
        task_always_eager=config.eager,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    engine = make_engine(config.database_url)
    stepped = Stepped(app, engine=engine, redis_url=config.redis_url)
    bench = Bench(config, app, stepped, engine)
    bench.tasks.update(_plain_tasks(app))
    bench.actions.update(_tree_actions(app))
    bench.actions.update(_sequence_actions(app, config.steps))
    bench.actions.update(_lane_actions(app))
    return bench


def _plain_tasks(app: Celery) -> dict[str, Any]:
    """Plain Celery: a trivial task (result stored), a fire-and-forget one, a tree node."""

    @app.task(name="bench.noop", shared=False)
    def noop() -> None:
        """A chord member, chord body, chain hop or tree leaf: does nothing."""

    @app.task(name="bench.fire", shared=False, ignore_result=True)
    def fire() -> None:
        """The target of ``delay()`` in scenario 4: does nothing, stores nothing."""

    @app.task(name="bench.node", bind=True, shared=False)
    def node(self: Any, level: int, width: int, fanout: int) -> None:
        """A tree node that replaces itself with the group of its children."""
        if level == 0:
            raise self.replace(group([node.si(1, width, fanout) for _ in range(width)]))
        raise self.replace(group([noop.si() for _ in range(fanout)]))

    return {"noop": noop, "fire": fire, "node": node}


def _tree_actions(app: Celery) -> dict[str, Any]:
    """Scenario 1 (one root, N leaves) and 2 (root, mids, leaves); 5 reuses 2."""

    @app.stepped_action(actor=Car, concurrency_key=lambda car, i: ["fan", car.id, i])
    def fan_leaf(car: Car, i: int) -> None:
        """A one-step child that does nothing."""

    @app.stepped_action(actor=Car)
    def fan_root(step: Any, car: Car, n: int) -> None:
        """One step starting ``n`` children."""
        for i in range(n):
            step.do(fan_leaf, i)

    @app.stepped_action(actor=Car, concurrency_key=lambda car, j, k: ["tree", car.id, j, k])
    def tree_leaf(car: Car, j: int, k: int) -> None:
        """A leaf: does nothing."""
        record_depth("leaf")

    @app.stepped_action(actor=Car, concurrency_key=lambda car, j, n: ["tree", car.id, j])
    def tree_mid(step: Any, car: Car, j: int, fanout: int) -> None:
        """A child of the root: one step starting ``fanout`` leaves."""
        record_depth("mid")
        for k in range(fanout):
            step.do(tree_leaf, j, k)

    @app.stepped_action(actor=Car)
    def tree_root(step: Any, car: Car, width: int, fanout: int) -> None:
        """The root: one step starting ``width`` children."""
        record_depth("root")
        for j in range(width):
            step.do(tree_mid, j, fanout)

    return {"fan_root": fan_root, "tree_root": tree_root}


def _sequence_actions(app: Celery, steps: int) -> dict[str, Any]:
    """Scenario 3: ``seq_root`` (each step starts one child) and ``seq_empty``."""

    @app.stepped_action(actor=Car, concurrency_key=lambda car, k: ["seq", car.id, k])
    def seq_hop(car: Car, k: int) -> None:
        """The child of one sequential step: does nothing."""

    seq_root = app.stepped_action("seq_root", actor=Car)
    seq_empty = app.stepped_action("seq_empty", actor=Car)

    def hop_step(k: int) -> Any:
        """Step ``k``: starts the child ``seq_hop(k)``."""

        def body(step: Any, car: Car) -> None:
            step.do(seq_hop, k)

        return body

    def empty_step(step: Any, car: Car) -> None:
        """A step with no children."""

    for k in range(steps):
        seq_root.step(hop_step(k))
        seq_empty.step(empty_step)
    return {"seq_root": seq_root, "seq_empty": seq_empty}


def _lane_key(car: Car, lane: str, *_: Any) -> list[Any]:
    return ["lane", car.id, lane]


def _lane_actions(app: Celery) -> dict[str, Any]:
    """Scenarios 4 and 6: an outbound lane holder, lane members, burst parents."""
    hold = app.stepped_action("hold", actor=Car, outbound=True, concurrency_key=_lane_key)

    @hold.step
    def hold_body(step: Any, car: Car, lane: str) -> None:
        """Nothing: the action then waits to be completed from outside (never, here)."""

    @app.stepped_action(actor=Car, concurrency_key=_lane_key)
    def lane_member(car: Car, lane: str, i: int) -> None:
        """Joins the lane of ``hold``; never performs while ``hold`` is current."""

    @app.stepped_action(actor=Car, concurrency_key=lambda car, lane, i: ["parent", car.id, lane, i])
    def burst_parent(step: Any, car: Car, lane: str, i: int) -> None:
        """A root of its own lane whose step starts a child in the shared lane."""
        step.do(lane_member, lane, i)

    return {"hold": hold, "lane_member": lane_member, "burst_parent": burst_parent}


def _from_env() -> Bench | None:
    config = Config.from_env()
    return build(config) if config is not None else None


#: The app built from the environment (None when the variables are not set).
BENCH = _from_env()
#: The Celery app of ``celery -A benchmarks.bench_app worker``.
app = BENCH.app if BENCH is not None else None
