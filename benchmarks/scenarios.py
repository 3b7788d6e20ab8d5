"""The scenarios: each stepped workload beside its plain-Celery counterpart.

Every function returns :class:`Row` objects (a stepped and, where there is one, a plain
:class:`~benchmarks.measure.Measurement`). A scenario never runs past its deadline: its
loops check it and its waits time out, and the row then says so in its status.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import chain, chord
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from benchmarks.bench_app import COUNTS, Bench, Car, Config
from benchmarks.measure import Measurement, Probe, ScenarioTimeout
from celery_stepped.models import Action

ROOT = Path(__file__).resolve().parent.parent
FINAL = {"succeeded", "failed", "cancelled", "timed_out", "deadlocked", "superseded"}
#: Seconds between two looks at a root action's status.
POLL = 0.05


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is (the issue's defaults)."""

    fan: int = 1000
    tree: tuple[int, int] = (50, 20)
    steps: int = 200
    lane_fill: tuple[int, ...] = (100, 10_000)
    lane_calls: int = 100
    eager: tuple[int, int] = (99, 100)
    burst: int = 2000


#: ``--quick``: every scenario small enough for a run of a minute or two.
QUICK = Sizes(
    fan=50, tree=(5, 10), steps=20, lane_fill=(10, 200), lane_calls=20, eager=(9, 10), burst=100
)


@dataclass
class Row:
    """One line of the table: a stepped measurement and its plain counterpart."""

    number: str
    title: str
    item: str
    stepped: Measurement
    plain: Measurement | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """Wall time per item, stepped over plain."""
        if self.plain is None or self.plain.wall <= 0 or self.stepped.items == 0:
            return None
        return self.stepped.ms(self.stepped.wall) / self.plain.ms(self.plain.wall)

    @property
    def cpu_ratio(self) -> float | None:
        """CPU per item (client + worker + Redis), stepped over plain."""
        if self.plain is None or self.plain.cpu <= 0 or self.stepped.items == 0:
            return None
        return self.stepped.ms(self.stepped.cpu) / self.plain.ms(self.plain.cpu)


class Samples:
    """Per-call samples: wall and CPU seconds, SQL statements and rows written."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.statements: list[int] = []
        self.rows: list[int] = []

    @contextmanager
    def sample(self) -> Iterator[None]:
        """Measure the block as one call."""
        statements, rows = COUNTS["statements"], COUNTS["rows"]
        started, cpu_started = time.perf_counter(), time.process_time()
        yield
        self.wall.append(time.perf_counter() - started)
        self.cpu.append(time.process_time() - cpu_started)
        self.statements.append(COUNTS["statements"] - statements)
        self.rows.append(COUNTS["rows"] - rows)

    def medians(self) -> dict[str, float]:
        """Median ms per call, wall (``median_ms``) and CPU (``median_cpu_ms``)."""
        if not self.wall:
            return {}
        return {
            "median_ms": 1000 * statistics.median(self.wall),
            "median_cpu_ms": 1000 * statistics.median(self.cpu),
        }

    def tenths(self) -> dict[str, float]:
        """The first tenth of the calls against the last: ``first_ms``, ``last_ms``
        (means), ``first_median_ms``, ``last_median_cpu_ms``, ``first_sql``, ``last_rows``..."""
        tenth = max(len(self.wall) // 10, 1)
        out: dict[str, float] = {"tenth": tenth}
        for name, values, scale in (
            ("ms", self.wall, 1000.0),
            ("cpu_ms", self.cpu, 1000.0),
            ("sql", self.statements, 1.0),
            ("rows", self.rows, 1.0),
        ):
            for end, part in (("first", values[:tenth]), ("last", values[-tenth:])):
                if part:
                    out[f"{end}_{name}"] = scale * statistics.fmean(part)
                    out[f"{end}_median_{name}"] = scale * statistics.median(part)
        return out


class Scenarios:
    """Runs the scenarios on one built app, one probe and one set of workers."""

    def __init__(
        self, bench: Bench, probe: Probe, watch: Engine, sizes: Sizes, limit: float
    ) -> None:
        self.bench = bench
        self.probe = probe
        self.watch = watch  # an engine of its own: its queries are not counted
        self.sizes = sizes
        self.limit = limit

    def deadline(self) -> float:
        """When a scenario starting now must stop."""
        return time.monotonic() + self.limit

    def new_car(self, label: str) -> Car:
        """A fresh actor (each root gets its own, so its lanes are its own)."""
        with self.bench.stepped.session() as session:
            car = Car(label=label)
            session.add(car)
            session.flush()
        return car

    def wait_root(self, name: str, car: Car, deadline: float) -> Callable[[], str]:
        """A wait for the root action ``name`` on ``car`` to be final."""
        query = select(Action.status).where(
            Action.name == name,
            Action.actor_type == "Car",
            Action.actor_id == str(car.id),
            Action.root.is_(True),
        )

        def wait() -> str:
            while True:
                with self.watch.connect() as conn:
                    status = conn.scalar(query)
                if status in FINAL:
                    return "ok" if status == "succeeded" else f"root {status}"
                if time.monotonic() > deadline:
                    raise ScenarioTimeout(f"root {name} still {status or 'not started'}")
                time.sleep(POLL)

        return wait

    @staticmethod
    def wait_result(result: AsyncResult, deadline: float) -> Callable[[], str]:
        """A wait for a plain canvas's final result."""

        def wait() -> str:
            try:
                result.get(timeout=max(deadline - time.monotonic(), 0.1), propagate=False)
            except CeleryTimeout as exc:
                raise ScenarioTimeout(f"plain result still {result.state}") from exc
            return "ok" if result.successful() else f"plain {result.state}"

        return wait

    def stepped_root(
        self, what: str, items: int, name: str, args: tuple[Any, ...], deadline: float
    ) -> Measurement:
        """Measure ``later()`` of a root action on a fresh car until it is final."""
        car = self.new_car(name)
        action = self.bench.actions[name]
        return self.probe.measure(
            Measurement("stepped", what, items),
            lambda: action.later(car, *args),
            self.wait_root(name, car, deadline),
        )

    def plain_canvas(
        self, what: str, items: int, send: Callable[[], AsyncResult], deadline: float
    ) -> Measurement:
        """Measure sending a plain canvas until its result is ready."""
        sent: list[AsyncResult] = []
        return self.probe.measure(
            Measurement("plain", what, items),
            lambda: sent.append(send()),
            lambda: self.wait_result(sent[0], deadline)(),
        )

    # -- 1, 2, 3: trees and sequences on the workers -------------------------------------

    def fan(self) -> Row:
        """1. One root with N one-step children vs a chord of N trivial members."""
        n, deadline, noop = self.sizes.fan, self.deadline(), self.bench.tasks["noop"]
        plain = self.plain_canvas(
            f"chord of {n}", n, lambda: chord([noop.si() for _ in range(n)])(noop.si()), deadline
        )
        stepped = self.stepped_root(f"1 root, {n} children", n, "fan_root", (n,), deadline)
        return Row("1", f"fan-out: 1 root, {n:,} one-step children", "child", stepped, plain)

    def tree(self) -> Row:
        """2. Root -> W children -> F leaves each vs a tree built with ``Task.replace``."""
        (width, fanout), deadline = self.sizes.tree, self.deadline()
        leaves, node = width * fanout, self.bench.tasks["node"]
        plain = self.plain_canvas(
            "Task.replace tree", leaves, lambda: node.delay(0, width, fanout), deadline
        )
        stepped = self.stepped_root(
            f"{width} x {fanout} tree", leaves, "tree_root", (width, fanout), deadline
        )
        return Row("2", f"two-level tree {width} x {fanout}", "leaf", stepped, plain)

    def sequence(self) -> list[Row]:
        """3. One action of S steps (a child each; then empty) vs a chain of S tasks."""
        steps, noop, rows = self.bench.config.steps, self.bench.tasks["noop"], []
        kinds = (("3a", "seq_root", "one child each"), ("3b", "seq_empty", "no children"))
        for number, name, kind in kinds:
            deadline = self.deadline()
            plain = self.plain_canvas(
                f"chain of {steps}",
                steps,
                lambda: chain([noop.si() for _ in range(steps)]).apply_async(),
                deadline,
            )
            stepped = self.stepped_root(f"{steps} steps", steps, name, (), deadline)
            title = f"1 action of {steps} sequential steps, {kind}"
            rows.append(Row(number, title, "step", stepped, plain))
        return rows

    # -- 4, 6: lanes, in the client ------------------------------------------------------

    def lane(self) -> list[Row]:
        """4. ``.now()`` joining a lane after many entries vs ``task.delay()``, per call."""
        deadline, car = self.deadline(), self.new_car("lane")
        self.bench.actions["hold"].now(car, "entry")  # outbound: current, never completes
        rows, entered = [], 0
        for number, mark in zip("abcdef", self.sizes.lane_fill, strict=False):
            try:
                entered = self.fill_lane(car, entered, mark, deadline)
            except ScenarioTimeout as exc:
                failed = Measurement("stepped", "lane fill", 0, status=f"time limit: {exc}")
                rows.append(Row(f"4{number}", f".now() into a lane of {mark:,}", "call", failed))
                break
            rows.append(self.lane_row(f"4{number}", car, entered, deadline))
            entered += self.sizes.lane_calls
        return rows

    def fill_lane(self, car: Car, entered: int, mark: int, deadline: float) -> int:
        """Let root actions join the lane until ``mark`` have (each supersedes the last)."""
        member = self.bench.actions["lane_member"]
        for i in range(entered, mark):
            member.now(car, "entry", i)
            if time.monotonic() > deadline:
                raise ScenarioTimeout(f"filling stopped at {i + 1:,} of {mark:,} entries")
        return max(entered, mark)

    def lane_row(self, number: str, car: Car, entered: int, deadline: float) -> Row:
        """Measure ``lane_calls`` more entries, then as many plain ``delay()`` calls."""
        calls, member = self.sizes.lane_calls, self.bench.actions["lane_member"]
        fire = self.bench.tasks["fire"]
        lane = self.bench.stepped.lanes.get(f"lane/{car.id}/entry")
        pending = len(lane.pending_ids) if lane is not None else 0

        samples = Samples()

        def enter() -> None:
            for i in range(entered, entered + calls):
                with samples.sample():
                    member.now(car, "entry", i)
                if time.monotonic() > deadline:
                    raise ScenarioTimeout(f"{i - entered + 1} of {calls} calls")

        stepped = self.probe.measure(Measurement("stepped", ".now() into lane", calls), enter)
        plain = self.probe.measure(
            Measurement("plain", "task.delay()", calls),
            lambda: _repeat(calls, fire.delay),
        )
        title = f".now() into a lane after {entered:,} entries ({pending} pending)"
        return Row(number, title, "call", stepped, plain, {"entered": entered, **samples.medians()})

    def burst(self) -> Row:
        """6. K roots, each with a child joining one lane and superseding the last one."""
        k, deadline, car = self.sizes.burst, self.deadline(), self.new_car("burst")
        parent, stepped = self.bench.actions["burst_parent"], self.bench.stepped
        self.bench.actions["hold"].now(car, "burst")
        samples = Samples()

        def send() -> None:
            with stepped.capture() as jobs:
                for i in range(k):
                    with samples.sample():
                        parent.now(car, "burst", i)  # its step does step.do(lane_member)
                        jobs.perform(only="action")  # the child joins the lane, here
                    if time.monotonic() > deadline:
                        raise ScenarioTimeout(f"{i + 1:,} of {k:,} requests")

        measured = self.probe.measure(Measurement("stepped", "burst", k), send)
        measured.items = len(samples.wall)
        superseded = self.count_superseded(car)
        if measured.status == "ok" and superseded != len(samples.wall) - 1:
            measured.status = f"{superseded} superseded, expected {len(samples.wall) - 1}"
        title = f"superseding burst: {k:,} requests into one lane, distinct parents"
        return Row("6", title, "request", measured, None, samples.tenths())

    def count_superseded(self, car: Car) -> int:
        """Lane members on ``car`` that were superseded."""
        query = select(func.count()).where(
            Action.name == "lane_member",
            Action.actor_id == str(car.id),
            Action.status == "superseded",
        )
        with self.watch.connect() as conn:
            return int(conn.scalar(query) or 0)

    # -- 5: eager, in a child process ----------------------------------------------------

    def eager(self, config: Config) -> Row:
        """5. A W x F tree in eager mode, in a fresh process on SQLite."""
        width, fanout = self.sizes.eager
        nodes = 1 + width + width * fanout
        report: dict[str, Any] = {}
        command = [sys.executable, "-m", "benchmarks.eager", str(width), str(fanout)]

        def send() -> None:
            try:
                done = subprocess.run(
                    command,
                    cwd=ROOT,
                    env={**os.environ, **config.env()},
                    capture_output=True,
                    text=True,
                    timeout=self.limit,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise ScenarioTimeout(f"eager tree not done in {self.limit:.0f} s") from exc
            if done.returncode != 0:
                raise ScenarioTimeout(f"eager child failed: {done.stderr[-500:]}")
            report.update(json.loads(done.stdout.strip().splitlines()[-1]))

        measured = self.probe.measure(Measurement("stepped", "eager tree", nodes), send)
        if report:
            measured.wall, measured.client_cpu = report["seconds"], report["cpu"]
            measured.statements, measured.commits = report["statements"], report["commits"]
            measured.messages = report["tasks"]
            measured.status = report["status"]
        title = f"eager tree {width} x {fanout} ({nodes:,} nodes), in-process, SQLite"
        return Row("5", title, "node", measured, None, report)


def _repeat(times: int, call: Callable[[], Any]) -> None:
    for _ in range(times):
        call()
