"""Per-leaf cost in one process: ``python -m benchmarks.leaf_profile [N] [--seq] [--sql]``.

Eager mode (``task_always_eager``) on a temporary SQLite file and an embedded Redis:
one ``fan_root`` whose step starts N one-step children (``--seq``: one ``seq_root`` of N
steps, each starting one child). Prints SQL statements and
commits per child, CPU ms per child, and with ``--sql`` the statements of the last
child (those sent after the root's step), with ``--profile`` the top of a cProfile of
the whole run (cumulative). ``--repeat K`` runs the root K times and prints the
fastest run's CPU (the statement counts are the last run's).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import pstats
import tempfile
import time
from typing import Any

from sqlalchemy import event

from celery_stepped.embedded import EmbeddedRedis


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leaf_profile")
    parser.add_argument("n", type=int, nargs="?", default=200, help="children or steps")
    parser.add_argument("--seq", action="store_true", help="one action of N steps")
    parser.add_argument("--sql", action="store_true", help="print the last child's SQL")
    parser.add_argument("--profile", action="store_true", help="print a cProfile")
    parser.add_argument("--repeat", type=int, default=1, help="runs; the fastest counts")
    return parser.parse_args()


def main() -> None:
    options = _arguments()
    n = options.n
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as scratch:
        os.environ.update(
            BENCH_REDIS_URL=f"{server.url}/0",
            BENCH_DATABASE_URL=f"sqlite:///{scratch}/leaf.db",
            BENCH_EAGER="1",
            BENCH_STEPS=str(n) if options.seq else "2",
        )
        bench_app = importlib.import_module("benchmarks.bench_app")
        bench = bench_app.BENCH
        bench.stepped.create_all()
        bench_app.BenchBase.metadata.create_all(bench.engine)
        with bench.stepped.session() as session:
            car = bench_app.Car(label="leaf")
            session.add(car)
            session.commit()
            session.refresh(car)
            session.expunge(car)
        log: list[str] = []

        def record(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
            log.append(" ".join(statement.split())[:160])

        def record_commit(*_: Any) -> None:
            log.append("COMMIT")

        root, root_args = ("seq_root", ()) if options.seq else ("fan_root", (n,))
        bench.actions["fan_root"].later(car, 2)  # warm up
        event.listen(bench.engine, "before_cursor_execute", record)
        event.listen(bench.engine, "commit", record_commit)
        profile = cProfile.Profile() if options.profile else None
        repeat = options.repeat
        cpus = []
        for _ in range(repeat):
            del log[:]
            cpu = time.process_time()
            if profile:
                profile.enable()
            bench.actions[root].later(car, *root_args)
            if profile:
                profile.disable()
            cpus.append(time.process_time() - cpu)
        cpu = min(cpus)
        statements = sum(1 for line in log if line != "COMMIT")
        commits = log.count("COMMIT")
        print(
            f"children={n} stmts/child={statements / n:.2f} commits/child={commits / n:.2f}"
            f" cpu ms/child={cpu * 1000 / n:.2f}"
        )
        if options.sql:
            per = round(statements / n)
            tail = log[-(per + commits // n + 12) * 2 :]
            print("\n".join(tail))
        if profile:
            pstats.Stats(profile).sort_stats("cumulative").print_stats(45)
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
