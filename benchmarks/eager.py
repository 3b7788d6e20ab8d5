"""Scenario 5 in a process of its own: an eager W x F tree on SQLite.

``python -m benchmarks.eager WIDTH FANOUT`` with the ``BENCH_*`` variables of
``bench_app`` set (``BENCH_EAGER=1``). It builds the app with
``task_always_eager = True``, runs ``tree_root.later(car, WIDTH, FANOUT)`` (the whole
tree runs in this process), and prints one JSON line: nodes, seconds, CPU seconds,
resident memory before the tree and at its peak (sampled, and ``ru_maxrss``), SQL
statements and commits, tasks run, the stack depth of the step bodies at each level,
and the root's status.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import threading
import time
from types import ModuleType
from typing import Any

from sqlalchemy import func, select


def resident_kb() -> int:
    """This process's resident memory now, in KiB."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


class PeakMemory(threading.Thread):
    """Samples the resident memory every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.before = self.peak = resident_kb()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.peak = max(self.peak, resident_kb())

    def stop(self) -> int:
        """Stop sampling; the peak in KiB."""
        self.stopped.set()
        self.join()
        self.peak = max(self.peak, resident_kb())
        return self.peak


def setup() -> tuple[ModuleType, Any, Any]:
    """The app built from the environment (eager), its tables, the counters and a car."""
    bench_app = importlib.import_module("benchmarks.bench_app")
    bench = bench_app.BENCH
    if bench is None or not bench.config.eager:
        raise SystemExit("set the BENCH_* variables with BENCH_EAGER=1")
    bench.stepped.create_all()
    bench_app.BenchBase.metadata.create_all(bench.engine)
    bench_app.install_sql_counters(bench.engine)
    with bench.stepped.session() as session:
        car = bench_app.Car(label="eager")
        session.add(car)
        session.flush()
    return bench_app, bench, car


def run(width: int, fanout: int) -> dict[str, Any]:
    """Run the tree and measure it."""
    from celery_stepped.models import Action

    bench_app, bench, car = setup()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts_before = bench_app.COUNTS.copy()
    memory = PeakMemory()
    memory.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    bench.actions["tree_root"].later(car, width, fanout)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    peak = memory.stop()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts = bench_app.COUNTS - counts_before
    with bench.stepped.session() as session:
        status = session.scalar(
            select(Action.status).where(Action.name == "tree_root", Action.root.is_(True))
        )
        nodes = session.scalar(select(func.count()).select_from(Action))
    return {
        "nodes": nodes,
        "seconds": seconds,
        "cpu": cpu,
        "rss_before_kb": memory.before,
        "rss_peak_kb": peak,
        "rss_growth_kb": peak - memory.before,
        "maxrss_growth_kb": maxrss_after - maxrss_before,
        "statements": counts["statements"],
        "commits": counts["commits"],
        "tasks": counts["tasks"],
        "depths": bench_app.DEPTHS,
        "status": "ok" if status == "succeeded" else f"root {status}",
    }


def main() -> None:
    """Parse WIDTH and FANOUT, run, print the JSON line."""
    width, fanout = (int(v) for v in sys.argv[1:3])
    print(json.dumps(run(width, fanout)), flush=True)


if __name__ == "__main__":
    main()
