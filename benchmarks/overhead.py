"""Stepped's overhead against plain Celery, measured in one run on one broker and worker.

Three workloads run one after the other against the same Redis broker and the same
real ``celery worker`` process:

1. ``plain``: N plain Celery tasks, each adding one to a counter row in SQL;
2. ``roots``: N stepped root actions (``later()``), each a one-step action adding one
   to the same counter, each in a lane of its own;
3. ``fan-out``: one stepped root whose step fans out to N such child actions.

Each workload is timed from the first message sent until the counter shows all N
(for the stepped ones: until every action succeeded), and reported as actions per
second and as a ratio to plain Celery. Nothing is asserted: absolute numbers depend
on the machine; the ratios are what to watch.

Run ``python benchmarks/overhead.py --help``; see ``benchmarks/README.md``. The file
is also the worker's app module (``celery -A overhead worker``, from this directory),
built from the ``BENCH_*`` environment variables the script passes to the worker.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_stepped import Stepped
from celery_stepped.models import Action

HERE = Path(__file__).resolve().parent
ENV_BROKER, ENV_LANES, ENV_DATABASE = "BENCH_BROKER_URL", "BENCH_LANES_URL", "BENCH_DATABASE_URL"


class BenchBase(DeclarativeBase):
    """Declarative base of the benchmark's actor table."""


class Counter(BenchBase):
    """The actor every workload adds to."""

    __tablename__ = "bench_counters"

    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(default=0)


def build(broker_url: str, lanes_url: str, database_url: str) -> tuple[Celery, Stepped]:
    """The benchmark's app: the plain task and the stepped actions."""
    app = Celery("bench", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    stepped = Stepped(app, database_url=database_url, redis_url=lanes_url)

    def add_one(counter_id: int) -> None:
        with stepped.session() as s:
            s.execute(
                update(Counter).where(Counter.id == counter_id).values(value=Counter.value + 1)
            )

    @app.task(name="bench.plain", shared=False, ignore_result=True)
    def plain(counter_id: int, i: int) -> None:
        add_one(counter_id)

    bump = app.stepped_action(
        "bench_bump", actor=Counter, concurrency_key=lambda counter, i: ["bench", counter.id, i]
    )

    @bump.step
    def bump_body(step: Any, counter: Counter, i: int) -> None:
        step.session.execute(
            update(Counter).where(Counter.id == counter.id).values(value=Counter.value + 1)
        )

    fan = app.stepped_action("bench_fan", actor=Counter)

    @fan.step
    def fan_body(step: Any, counter: Counter, n: int) -> None:
        for i in range(n):
            step.do("bench_bump", i)

    return app, stepped


def _from_env() -> Celery | None:
    if ENV_BROKER not in os.environ:
        return None
    return build(os.environ[ENV_BROKER], os.environ[ENV_LANES], os.environ[ENV_DATABASE])[0]


#: The worker's app (``celery -A overhead worker``); None when run as a script.
app = _from_env()


# -- measuring -------------------------------------------------------------------------


class Bench:
    """The script's side: the app, a counter row and the workloads."""

    def __init__(self, stepped: Stepped) -> None:
        self.stepped = stepped
        with stepped.session() as s:
            counter = Counter(value=0)
            s.add(counter)
            s.flush()
            s.refresh(counter)
            s.expunge(counter)
        self.counter = counter

    def value(self) -> int:
        with self.stepped.session() as s:
            return int(s.scalar(select(Counter.value).where(Counter.id == self.counter.id)) or 0)

    def succeeded(self, name: str) -> int:
        with self.stepped.session() as s:
            query = select(func.count()).where(Action.name == name, Action.status == "succeeded")
            return int(s.scalar(query) or 0)

    def reset(self) -> None:
        with self.stepped.session() as s:
            s.execute(update(Counter).where(Counter.id == self.counter.id).values(value=0))

    def run(self, send: Callable[[], None], done: Callable[[], bool], limit: float) -> float:
        """Seconds from the first message until ``done()``."""
        self.reset()
        started = time.perf_counter()
        send()
        deadline = started + limit
        while not done():
            if time.perf_counter() > deadline:
                raise TimeoutError("the workload did not finish in time")
            time.sleep(0.01)
        return time.perf_counter() - started

    def plain(self, n: int, limit: float) -> float:
        task = self.stepped.app.tasks["bench.plain"]

        def send() -> None:
            with self.stepped.app.producer_or_acquire() as producer:
                for i in range(n):
                    task.apply_async((self.counter.id, i), producer=producer)

        return self.run(send, lambda: self.value() >= n, limit)

    def roots(self, n: int, limit: float) -> float:
        bump = self.stepped.registry.find(Counter, "bench_bump")
        before = self.succeeded("bench_bump")

        def send() -> None:
            for i in range(n):
                bump.later(self.counter, i)

        return self.run(send, lambda: self.succeeded("bench_bump") >= before + n, limit)

    def fan_out(self, n: int, limit: float) -> float:
        fan = self.stepped.registry.find(Counter, "bench_fan")
        before = self.succeeded("bench_fan")
        return self.run(
            lambda: fan.later(self.counter, n),
            lambda: self.succeeded("bench_fan") > before and self.value() >= n,
            limit,
        )


@contextmanager
def redis_base(url: str | None) -> Iterator[str]:
    """The given Redis, or an embedded server for the run."""
    if url:
        yield re.sub(r"/\d+$", "", url.rstrip("/"))
        return
    from celery_stepped.embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=300, help="tasks/actions per workload")
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the three workloads")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("STEPPED_REDIS_URL"),
        help="Redis server (db 2 broker, db 1 lanes); default: $STEPPED_REDIS_URL or embedded",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("STEPPED_DATABASE_URL"),
        help="a scratch database (its Stepped tables are dropped and created); "
        "default: $STEPPED_DATABASE_URL or a temporary SQLite file",
    )
    parser.add_argument("--limit", type=float, default=600, help="seconds per workload at most")
    args = parser.parse_args(argv)

    from celery_stepped.embedded import WorkerProcess

    scratch = tempfile.mkdtemp(prefix="stepped-bench-")
    database_url = args.database_url or f"sqlite:///{scratch}/bench.db"
    with redis_base(args.redis_url) as base:
        import redis

        for db in (1, 2):
            redis.Redis.from_url(f"{base}/{db}").flushdb()
        env = {ENV_BROKER: f"{base}/2", ENV_LANES: f"{base}/1", ENV_DATABASE: database_url}
        _, stepped = build(env[ENV_BROKER], env[ENV_LANES], database_url)
        stepped.drop_all()
        BenchBase.metadata.drop_all(stepped.engine)
        stepped.create_all()
        BenchBase.metadata.create_all(stepped.engine)
        bench = Bench(stepped)
        worker = WorkerProcess(
            "overhead",
            queues="stepped,celery",
            concurrency=args.concurrency,
            env=env,
            cwd=str(HERE),
            logfile=os.path.join(scratch, "worker.log"),
        )
        print(f"database {stepped.engine.url.render_as_string(hide_password=True)}")
        print(f"broker   {env[ENV_BROKER]}; one worker, {args.concurrency} pool processes")
        with worker:
            warm = max(10, args.concurrency * 4)
            bench.plain(warm, args.limit)
            bench.roots(warm, args.limit)
            bench.fan_out(warm, args.limit)
            for round_ in range(1, args.repeat + 1):
                report(round_, args.n, bench, args.limit)
        stepped.engine.dispose()
    shutil.rmtree(scratch, ignore_errors=True)


def report(round_: int, n: int, bench: Bench, limit: float) -> None:
    """Run the three workloads once and print their rates and ratios."""
    plain = bench.plain(n, limit)
    roots = bench.roots(n, limit)
    fan = bench.fan_out(n, limit)
    print(f"\nround {round_}: N = {n}")
    print(f"{'workload':<34}{'seconds':>9}{'per second':>12}{'vs plain':>10}")
    for label, seconds in (
        ("plain Celery tasks", plain),
        ("stepped root actions", roots),
        ("one stepped root, N children", fan),
    ):
        print(f"{label:<34}{seconds:>9.2f}{n / seconds:>12.1f}{plain / seconds:>10.2f}")
    print(f"overhead: roots {roots / plain:.1f}x plain, fan-out {fan / plain:.1f}x plain")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
