"""Instructions per item, counted by Valgrind: ``python -m benchmarks.instructions``.

Wall-clock ratios on a shared 2-core machine move by 0.3x or more from one round to
the next (see README.md), more than most single changes to the hot path. This counts
CPU instructions instead (``valgrind --tool=callgrind``), which repeat to a fraction of
a percent: each workload runs twice, at two sizes, in a fresh process, and the
difference divided by the difference in items cancels start-up, imports and warm-up.

Workloads (``--only``):

- ``fan`` and ``chord``: a worker (``-P solo``: consumer and task in one process)
  runs one root whose step starts N one-step children; a chord of N trivial members.
- ``seq`` and ``chain``: a worker runs one action of N sequential steps, a child each;
  a chain of N trivial tasks (its hop carries the rest of the chain, so its cost grows
  with N).
- ``eager-fan`` and ``eager-seq``: the same two stepped workloads in one process in
  eager mode (``benchmarks.leaf_profile``): the engine without Celery's worker.

Redis runs in a process of its own (embedded), so its work is not counted here; the
database is a temporary SQLite file. Instructions are not time: code that runs at a
different rate per instruction (Python's interpreter loop against C's JSON codec, say)
compares differently in seconds. Use it to compare two commits on one workload (an
A/B of a change), and ``benchmarks.run`` for the ratios of issue 12. Needs Valgrind
(``apt-get install valgrind``); it takes a few minutes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery_stepped.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
PAIRS = {"fan": "chord", "seq": "chain"}
WORKLOADS = ("fan", "chord", "seq", "chain", "eager-fan", "eager-seq")
_COLLECTED = re.compile(r"Collected : (\d+)")
_SOLO = ["worker", "-P", "solo", "-Q", "stepped,celery", "-l", "WARNING"]
_SOLO += ["--without-gossip", "--without-mingle", "--without-heartbeat"]


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions")
    parser.add_argument("--small", type=int, default=50, help="items of the first run (50)")
    parser.add_argument("--large", type=int, default=150, help="items of the second (150)")
    parser.add_argument("--only", default=",".join(WORKLOADS), help="workloads, e.g. fan,chord")
    parser.add_argument("--run", nargs=2, metavar=("WORKLOAD", "N"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _collected(stderr: str) -> int:
    found = _COLLECTED.findall(stderr)
    if not found:
        raise RuntimeError(f"callgrind printed no total:\n{stderr[-2000:]}")
    return int(found[-1])


def _callgrind(*command: str) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command]


def _until(what: str, done: Callable[[], bool], limit: float = 3600) -> None:
    deadline = time.monotonic() + limit
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {limit:.0f} s")
        time.sleep(0.5)


def _send(bench_app: Any, workload: str, n: int) -> Callable[[], bool]:
    """Start ``workload`` of ``n`` items from this process; a check that it finished."""
    from celery import chain, chord
    from sqlalchemy import func, select

    from celery_stepped.models import Action

    bench = bench_app.BENCH
    noop = bench.tasks["noop"]
    if workload in PAIRS.values():
        canvas = [noop.si() for _ in range(n)]
        result = chord(canvas)(noop.si()) if workload == "chord" else chain(canvas).apply_async()
        return result.ready
    name = "fan_root" if workload == "fan" else "seq_root"
    with bench.stepped.session() as s:
        car = bench_app.Car(label=workload)
        s.add(car)
        s.commit()
        s.refresh(car)
        s.expunge(car)
    bench.actions[name].later(car, *([n] if workload == "fan" else []))

    def finished() -> bool:
        with bench.stepped.session() as s:
            query = select(func.count()).select_from(Action)
            return bool(s.scalar(query.where(Action.name == name, Action.status == "succeeded")))

    return finished


def in_worker(workload: str, n: int) -> int:
    """Instructions a solo worker spent from its start until it ran ``workload`` (run
    in a process of its own: ``benchmarks.bench_app`` reads its configuration once)."""
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as scratch:
        os.environ.update(
            BENCH_REDIS_URL=f"{server.url}/0",
            BENCH_DATABASE_URL=f"sqlite:///{scratch}/bench.db",
            BENCH_STEPS=str(n),
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        bench_app = importlib.import_module("benchmarks.bench_app")
        bench = bench_app.BENCH
        bench.stepped.create_all()
        bench_app.BenchBase.metadata.create_all(bench.engine)
        worker = subprocess.Popen(
            _callgrind(sys.executable, "-m", "celery", "-A", "benchmarks.bench_app", *_SOLO),
            env=env,
            cwd=str(ROOT),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _until(f"{workload} of {n}", _send(bench_app, workload, n))
        finally:
            worker.send_signal(signal.SIGTERM)
            _, stderr = worker.communicate(timeout=600)
            bench.engine.dispose()
        return _collected(stderr)


def eager(workload: str, n: int) -> int:
    """Instructions of ``benchmarks.leaf_profile`` (eager mode, one process)."""
    extra = ["--seq"] if workload == "eager-seq" else []
    command = _callgrind(sys.executable, "-m", "benchmarks.leaf_profile", str(n), *extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, cwd=str(ROOT), capture_output=True, text=True)
    return _collected(done.stderr)


def _run(workload: str, n: int) -> int:
    """One run, in a fresh process."""
    if workload.startswith("eager"):
        return eager(workload, n)
    command = [sys.executable, "-m", "benchmarks.instructions", "--run", workload, str(n)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, cwd=str(ROOT), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{workload} of {n} failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.split()[-1])


def per_item(workload: str, small: int, large: int) -> float:
    """Instructions per item: the difference of two runs over the difference in items."""
    return (_run(workload, large) - _run(workload, small)) / (large - small)


def main(argv: list[str] | None = None) -> None:
    options = _arguments(argv)
    if options.run:
        print(in_worker(options.run[0], int(options.run[1])))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not on PATH: apt-get install valgrind")
    wanted = [w for w in options.only.split(",") if w]
    unknown = sorted(set(wanted) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workload(s) {', '.join(unknown)}: {', '.join(WORKLOADS)}")
    counted: dict[str, float] = {}
    print(f"instructions per item, runs of {options.small} and {options.large} items")
    for workload in wanted:
        counted[workload] = per_item(workload, options.small, options.large)
        print(f"{workload:10} {counted[workload] / 1e6:8.2f} M", flush=True)
    for stepped, plain in PAIRS.items():
        if stepped in counted and plain in counted:
            print(f"{stepped}/{plain}: {counted[stepped] / counted[plain]:.2f}x")


if __name__ == "__main__":
    main()
