"""Watching the garage's trees while the worker runs them (the example's display).

``Watcher.poll()`` reads the Stepped tables and turns what changed since the last poll
into one-line events: a service moving to its next step, an action queued in a busy
lane, superseded, failed or skipped by its checksum. On a terminal the events scroll
under a live table with one progress bar per car; otherwise they are printed as lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from celery_stepped import Stepped
from celery_stepped.models import Action, ParentLink

FINAL = {"succeeded", "failed", "cancelled", "superseded", "timed_out", "deadlocked"}


@dataclass
class Snapshot:
    """What the watcher knows of one action."""

    id: int
    name: str
    actor: tuple[str, str]
    arguments: list[Any]
    status: str
    root: bool
    step: int
    lane: str
    request: str | None


@dataclass
class Watcher:
    """Polls the database and reports what changed, relative to ``started`` (monotonic).

    Args:
        stepped: the Stepped instance of the garage.
        labels: display text per actor, keyed by ``(actor_type, actor_id)``.
        step_names: the root action's step names, for "step 3/5 repair".
        emit: called with each event line.
    """

    stepped: Stepped
    labels: dict[tuple[str, str], str]
    step_names: list[str]
    emit: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)
    seen: dict[int, Snapshot] = field(default_factory=dict)
    skipped_links: set[int] = field(default_factory=set)

    def label(self, actor: tuple[str, str]) -> str:
        return self.labels.get(actor, "/".join(actor))

    def say(self, text: str) -> None:
        self.emit(f"{time.monotonic() - self.started:5.1f}s  {text}")

    def poll(self) -> None:
        """Read every action and skipped member; emit an event for each change."""
        with self.stepped.session_factory() as session:
            rows = session.execute(
                select(
                    Action.id,
                    Action.name,
                    Action.actor_type,
                    Action.actor_id,
                    Action.arguments,
                    Action.status,
                    Action.root,
                    Action.current_step_index,
                    Action.concurrency_key,
                    Action.request_id,
                ).order_by(Action.id)
            ).all()
            skipped = session.execute(
                select(ParentLink.id, ParentLink.call).where(
                    ParentLink.kind == "action",
                    ParentLink.action_id.is_(None),
                    ParentLink.state == "done",
                )
            ).all()
        for link_id, call in skipped:
            if link_id not in self.skipped_links:
                self.skipped_links.add(link_id)
                actor = (str(call["actor"][0]), str(call["actor"][1]))
                self.say(
                    f"{call['name']} on {self.label(actor)}: skipped, its checksum "
                    "is already achieved (no new row)"
                )
        for row in rows:
            now = Snapshot(
                row.id,
                row.name,
                (row.actor_type, row.actor_id),
                list(row.arguments or []),
                row.status,
                row.root,
                row.current_step_index,
                row.concurrency_key,
                row.request_id,
            )
            self._compare(self.seen.get(row.id), now)
            self.seen[row.id] = now

    def _compare(self, before: Snapshot | None, now: Snapshot) -> None:
        if now.root:
            self._root_progress(before, now)
        elif before is None or before.status != now.status:
            self._child_event(now)

    def _root_progress(self, before: Snapshot | None, now: Snapshot) -> None:
        who = f"{self.label(now.actor)}: {now.name}"
        if now.status in FINAL:
            if before is None or before.status != now.status:
                self.say(f"{who} {now.status.upper()}")
            return
        if now.status == "performing" and (before is None or before.step != now.step):
            index = min(now.step, len(self.step_names) - 1)
            total = len(self.step_names)
            self.say(f"{who} step {index + 1}/{total} {self.step_names[index]}")

    def _child_event(self, now: Snapshot) -> None:
        what = f"#{now.id} {now.name}{_args(now.arguments)} on {self.label(now.actor)}"
        if now.status == "pending":
            lane = self.stepped.lanes.get(now.lane)
            busy = f" with #{lane.current_id}" if lane and lane.current_id else ""
            self.say(f"{what}: pending, lane {now.lane} is busy{busy}")
        elif now.status == "superseded":
            self.say(f"{what}: superseded by a newer one; its parent step now waits on that")
        elif now.status in ("failed", "timed_out", "deadlocked", "cancelled"):
            self.say(f"{what}: {now.status.upper()}")

    def roots(self) -> list[Snapshot]:
        """Root actions seen so far, in creation order."""
        return [s for s in self.seen.values() if s.root]

    def counts(self) -> dict[str, int]:
        """Totals for the summary line."""
        with self.stepped.session_factory() as session:
            by_status = dict(
                session.execute(select(Action.status, func.count()).group_by(Action.status)).all()
            )
        return {
            "actions": sum(by_status.values()),
            "superseded": by_status.get("superseded", 0),
            "skipped": len(self.skipped_links),
        }


def _args(arguments: list[Any]) -> str:
    shown = [a for a in arguments if not isinstance(a, dict)]
    return f"({', '.join(repr(a) for a in shown)})" if shown else ""


def live_table(watcher: Watcher) -> Any:
    """A rich table: one row per service with a progress bar of its steps."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    total = len(watcher.step_names)
    table = Table(title="Servicing the fleet", title_justify="left", expand=False)
    for column in ("car", "service", "progress", "step", "status"):
        table.add_column(column)
    styles = {"succeeded": "green", "failed": "bold red", "performing": "cyan"}
    for root in watcher.roots():
        done = total if root.status in FINAL else min(root.step, total)
        step = "" if root.status in FINAL else watcher.step_names[min(root.step, total - 1)]
        table.add_row(
            watcher.label(root.actor),
            f"#{root.id}",
            ProgressBar(total=total, completed=done, width=20),
            step,
            f"[{styles.get(root.status, '')}]{root.status}[/]",
        )
    return table
