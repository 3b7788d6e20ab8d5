"""What one measurement reads before and after a workload, and what it reports.

- CPU of the worker: utime + stime of its main process and of every pool process
  (``/proc/<pid>/stat``), plus the CPU of pool processes it already reaped;
- CPU of ``redis-server``: ``INFO cpu`` (``used_cpu_user + used_cpu_sys``);
- Redis commands: ``INFO commandstats``, the sum of ``calls`` over every command except
  ``info`` (the probe's own); commands that Lua scripts run count one by one;
- SQL statements, commits and Celery tasks received in the workers: the hash the
  worker processes add to in the metrics Redis (see ``bench_app``);
- the client (this process): CPU (``time.process_time``) and SQL statements and
  commits while it sends the workload, not while it waits for the result.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import redis

from benchmarks.bench_app import COUNTS, COUNTS_KEY

_TICKS = os.sysconf("SC_CLK_TCK")


class ScenarioTimeout(Exception):
    """A workload did not finish within the per-scenario time limit."""


def process_cpu(pid: int, *, reaped: bool = False) -> float:
    """CPU seconds of one process (with ``reaped``: plus its waited-for children)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


def redis_cpu(client: redis.Redis) -> float:
    """CPU seconds the Redis server has used."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def redis_calls(client: redis.Redis) -> int:
    """Commands the Redis server has run, the probe's ``INFO`` excluded."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


@dataclass(frozen=True)
class Snapshot:
    """The counters at one instant."""

    workers_cpu: float
    redis_cpu: float
    redis_calls: int
    workers: Counter[str]


@dataclass
class Measurement:
    """One workload's totals; ``per_item`` divides them by ``items``."""

    side: str
    what: str
    items: int
    wall: float = 0.0
    client_cpu: float = 0.0
    workers_cpu: float = 0.0
    redis_cpu: float = 0.0
    statements: int = 0
    commits: int = 0
    redis_calls: int = 0
    messages: int = 0
    status: str = "ok"

    @property
    def cpu(self) -> float:
        """CPU seconds of the client, the worker and Redis together."""
        return self.client_cpu + self.workers_cpu + self.redis_cpu

    def ms(self, seconds: float) -> float:
        """Milliseconds per item."""
        return 1000 * seconds / max(self.items, 1)

    def per_item(self, count: int) -> float:
        """A count per item."""
        return count / max(self.items, 1)


class Probe:
    """Reads the counters of the measured Redis, the worker and the metrics hash."""

    def __init__(
        self,
        measured: redis.Redis,
        metrics: redis.Redis,
        worker_pids: Callable[[], list[int]],
    ) -> None:
        self.measured = measured
        self.metrics = metrics
        self.worker_pids = worker_pids

    def workers(self) -> Counter[str]:
        """The counters every worker process flushed so far."""
        raw: dict[bytes, bytes] = self.metrics.hgetall(COUNTS_KEY)  # type: ignore[assignment]
        return Counter({k.decode(): int(v) for k, v in raw.items()})

    def snapshot(self) -> Snapshot:
        """CPU and counters now."""
        pids = self.worker_pids()
        cpu = sum(process_cpu(pid, reaped=i == 0) for i, pid in enumerate(pids))
        return Snapshot(cpu, redis_cpu(self.measured), redis_calls(self.measured), self.workers())

    def quiesce(self, timeout: float = 30.0, quiet: float = 0.3) -> None:
        """Wait until the workers received no task for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        last = self.workers()["tasks"]
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.workers()["tasks"]
            if now == last:
                return
            last = now

    def measure(
        self,
        result: Measurement,
        send: Callable[[], None],
        wait: Callable[[], str] | None = None,
    ) -> Measurement:
        """Fill ``result``: run ``send`` (the client's part), then ``wait`` for the end."""
        self.quiesce()
        before = self.snapshot()
        client_before = COUNTS.copy()
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            send()
            result.client_cpu = time.process_time() - cpu_started
            client = COUNTS - client_before
            result.status = wait() if wait is not None else "ok"
        except ScenarioTimeout as exc:
            result.client_cpu = time.process_time() - cpu_started
            client, result.status = COUNTS - client_before, f"time limit: {exc}"
        result.wall = time.perf_counter() - started
        self.quiesce()
        self._fill(result, before, self.snapshot(), client)
        return result

    @staticmethod
    def _fill(result: Measurement, before: Snapshot, after: Snapshot, client: Counter[str]) -> None:
        workers = after.workers - before.workers
        result.workers_cpu = max(after.workers_cpu - before.workers_cpu, 0.0)
        result.redis_cpu = max(after.redis_cpu - before.redis_cpu, 0.0)
        result.redis_calls = after.redis_calls - before.redis_calls
        result.statements = workers["statements"] + client["statements"]
        result.commits = workers["commits"] + client["commits"]
        result.messages = workers["tasks"]
