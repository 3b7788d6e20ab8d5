"""The table, the issue's targets and the machine description, as Markdown."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import redis
from sqlalchemy.engine import Engine

from benchmarks.measure import Measurement
from benchmarks.scenarios import Row

HERE = Path(__file__).resolve().parent
HEADER = (
    "#",
    "scenario",
    "side",
    "items",
    "ms/item (wall)",
    "CPU ms/item client",
    "CPU workers",
    "CPU redis",
    "SQL stmts/item",
    "commits/item",
    "Redis cmds/item",
    "msgs/item",
    "stepped/plain",
)


@dataclass(frozen=True)
class Target:
    """One goal of the issue: its value on wall time (judged) and on CPU time (shown)."""

    name: str
    limit: float
    wall: float | None
    cpu: float | None = None
    at_least: bool = False  # a rate, higher is better; otherwise a ratio, lower is better

    @property
    def verdict(self) -> str:
        """PASS, MISS, or n/a when the scenario did not produce a number."""
        if self.wall is None:
            return "n/a"
        met = self.wall >= self.limit if self.at_least else self.wall <= self.limit
        return "PASS" if met else "MISS"

    def _show(self, value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:,.0f}/s" if self.at_least else f"{value:.2f}x"

    def cells(self) -> tuple[str, ...]:
        """The target's line in the targets table."""
        goal = f">= {self.limit:,.0f}/s" if self.at_least else f"<= {self.limit}x"
        return (self.name, self._show(self.wall), self._show(self.cpu), goal, self.verdict)


def _markdown(header: tuple[str, ...], lines: Sequence[tuple[str, ...]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _cells(m: Measurement) -> tuple[str, ...]:
    side = f"{m.side}: {m.what}" + ("" if m.status == "ok" else f" **({m.status})**")
    return (
        side,
        f"{m.items:,}",
        f"{m.ms(m.wall):.2f}",
        f"{m.ms(m.client_cpu):.2f}",
        f"{m.ms(m.workers_cpu):.2f}",
        f"{m.ms(m.redis_cpu):.2f}",
        f"{m.per_item(m.statements):.1f}",
        f"{m.per_item(m.commits):.1f}",
        f"{m.per_item(m.redis_calls):.1f}",
        f"{m.per_item(m.messages):.2f}",
    )


def table(rows: list[Row]) -> str:
    """The main table: each stepped line, then its plain counterpart."""
    lines: list[tuple[str, ...]] = []
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        lines.append((row.number, f"{row.title} (per {row.item})", *_cells(row.stepped), ratio))
        if row.plain is not None:
            lines.append(("", "", *_cells(row.plain), ""))
    return _markdown(HEADER, lines)


def _ok(row: Row | None) -> bool:
    return row is not None and row.stepped.status == "ok" and row.stepped.items > 0


def _ratio_target(name: str, row: Row | None, limit: float) -> Target:
    if not _ok(row) or row is None or row.plain is None or row.plain.status != "ok":
        return Target(name, limit, None)
    return Target(name, limit, row.ratio, row.cpu_ratio)


def _lane_growth(lanes: list[Row]) -> Target:
    if len(lanes) < 2:
        return Target("lane entry after many entries within 1.2x of after few", 1.2, None)
    first, last = lanes[0].extra, lanes[-1].extra
    name = (
        f"lane entry after {last['entered']:,} entries within 1.2x of "
        f"after {first['entered']:,} (median per call)"
    )
    wall = last["median_ms"] / first["median_ms"]
    return Target(name, 1.2, wall, last["median_cpu_ms"] / first["median_cpu_ms"])


def _eager_target(row: Row | None) -> Target:
    name = "eager >= 1,000 nodes/s"
    if not _ok(row) or row is None:
        return Target(name, 1000, None, at_least=True)
    m = row.stepped
    return Target(name, 1000, m.items / m.wall, m.items / max(m.client_cpu, 1e-9), at_least=True)


def _burst_target(row: Row | None) -> Target:
    name = "superseding burst: last 10% / first 10% ~ 1 (median per request)"
    if not _ok(row) or row is None:
        return Target(name, 1.2, None)
    e = row.extra
    wall = e["last_median_ms"] / e["first_median_ms"]
    return Target(name, 1.2, wall, e["last_median_cpu_ms"] / e["first_median_cpu_ms"])


def targets(rows: list[Row]) -> list[Target]:
    """The issue's targets, computed from the rows that ran."""
    by = {row.number: row for row in rows}
    lanes = [row for row in rows if row.number.startswith("4") and _ok(row)]
    return [
        _ratio_target("fan-out child <= 1.5x chord member", by.get("1"), 1.5),
        _ratio_target("two-level leaf <= 2x Task.replace leaf", by.get("2"), 2),
        _ratio_target("sequential step <= 2x chain hop", by.get("3a"), 2),
        _ratio_target(".now() into a lane <= 3x task.delay()", lanes[0] if lanes else None, 3),
        _lane_growth(lanes),
        _eager_target(by.get("5")),
        _burst_target(by.get("6")),
    ]


def targets_table(found: list[Target]) -> str:
    """The targets as a Markdown table."""
    header = ("target (issue 12)", "measured (wall)", "same on CPU", "goal", "verdict (wall)")
    return _markdown(header, [t.cells() for t in found])


def _lane_detail(lanes: list[Row]) -> str:
    first, last = lanes[0], lanes[-1]
    a, b = first.stepped, last.stepped
    return (
        f"4. lane entry after {first.extra['entered']:,} and after {last.extra['entered']:,} "
        f"entries, per call: median {first.extra['median_ms']:.2f} and "
        f"{last.extra['median_ms']:.2f} ms wall (mean {a.ms(a.wall):.2f} and {b.ms(b.wall):.2f}), "
        f"median {first.extra['median_cpu_ms']:.2f} and {last.extra['median_cpu_ms']:.2f} ms "
        f"client CPU, {a.per_item(a.statements):.1f} and {b.per_item(b.statements):.1f} SQL "
        f"statements, {a.per_item(a.redis_calls):.1f} and {b.per_item(b.redis_calls):.1f} "
        "Redis commands."
    )


def _eager_detail(row: Row) -> str:
    e, m = row.extra, row.stepped
    depths = e.get("depths", {})
    spread = [v for pair in depths.values() for v in pair]
    constant = bool(spread) and max(spread) - min(spread) <= 2
    shown = ", ".join(f"{k} {lo}-{hi}" for k, (lo, hi) in sorted(depths.items()))
    return (
        f"5. eager: {m.items / max(m.wall, 1e-9):,.0f} nodes/s "
        f"({m.items / max(m.client_cpu, 1e-9):,.0f} per CPU second); resident memory "
        f"{e['rss_before_kb'] / 1024:.0f} MiB before the tree, at most "
        f"{e['rss_peak_kb'] / 1024:.0f} MiB during it (+{e['rss_growth_kb'] / 1024:.1f} MiB, "
        f"sampled every 50 ms; ru_maxrss +{e['maxrss_growth_kb'] / 1024:.1f} MiB); "
        f"stack depth of the step bodies by level: {shown}: "
        f"{'constant' if constant else 'NOT constant'}."
    )


def _burst_detail(row: Row) -> str:
    e = row.extra
    return (
        f"6. burst, first {e['tenth']:,} requests against last {e['tenth']:,}, per request: "
        f"median {e['first_median_ms']:.2f} and {e['last_median_ms']:.2f} ms wall "
        f"(mean {e['first_ms']:.2f} and {e['last_ms']:.2f}), median "
        f"{e['first_median_cpu_ms']:.2f} and {e['last_median_cpu_ms']:.2f} ms CPU, "
        f"{e['first_sql']:.1f} and {e['last_sql']:.1f} SQL statements, "
        f"{e['first_rows']:.1f} and {e['last_rows']:.1f} rows written per request."
    )


def details(rows: list[Row]) -> list[str]:
    """What the table cannot show: lane entry, eager memory and stack, burst tenths."""
    by = {row.number: row for row in rows}
    lanes = [row for row in rows if row.number.startswith("4") and _ok(row)]
    out = [_lane_detail(lanes)] if len(lanes) >= 2 else []
    if _ok(by.get("5")) and by["5"].extra:
        out.append(_eager_detail(by["5"]))
    if _ok(by.get("6")) and by["6"].extra:
        out.append(_burst_detail(by["6"]))
    out += [_rounds_detail(row) for row in rows if row.extra.get("rounds")]
    return out


def _rounds_detail(row: Row) -> str:
    """The figure of every round of a row (the table shows the median round)."""
    figures = row.extra["rounds"]
    if row.extra.get("rounds_ratio"):
        shown = ", ".join(f"{value:.2f}x" for value in figures)
        return (
            f"{row.number}. stepped/plain in each of {len(figures)} rounds: {shown} (median shown)"
        )
    shown = ", ".join(f"{value:.2f}" for value in figures)
    return (
        f"{row.number}. ms per {row.item} in each of {len(figures)} rounds: {shown} (median shown)"
    )


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def _first_line(path: str, prefix: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "-"


def _commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "-"
    return done.stdout.strip() or "-"


def _database(engine: Engine) -> str:
    if engine.dialect.name == "sqlite":
        return f"SQLite {sqlite3.sqlite_version} (a temporary file, WAL)"
    with engine.connect():
        info = engine.dialect.server_version_info or ()
    return f"{engine.dialect.name} {'.'.join(str(v) for v in info)} (a scratch schema)"


def machine(measured: redis.Redis, engine: Engine, redis_kind: str) -> list[tuple[str, str]]:
    """What the numbers were measured on."""
    memory_kb = _first_line("/proc/meminfo", "MemTotal").split()[0]
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return [
        ("CPUs (nproc)", f"{len(os.sched_getaffinity(0))} of {os.cpu_count()}"),
        ("CPU model", _first_line("/proc/cpuinfo", "model name")),
        ("memory", f"{int(memory_kb) / 1024**2:.1f} GiB"),
        ("load average at start", load),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        ("Celery / kombu", f"{_package('celery')} / {_package('kombu')}"),
        ("SQLAlchemy", _package("SQLAlchemy")),
        ("redis-py", _package("redis")),
        ("Redis server", f"{measured.info('server')['redis_version']} ({redis_kind})"),
        ("database", _database(engine)),
        ("celery_stepped", f"{_package('celery-stepped')} at commit {_commit()}"),
    ]


def machine_table(facts: list[tuple[str, str]]) -> str:
    """The machine description as a Markdown table."""
    return _markdown(("", ""), facts)
