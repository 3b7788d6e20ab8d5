"""Rebuilding lanes from SQL (the lane half of :mod:`celery_stepped.repair`).

SQL is the truth: a lane's current action is the action performing under its key (or,
when none performs, the pending action Redis already made current, else the newest
pending one), its pending action the newest other pending one; older pending actions are
superseded by whichever of the two is newest, as a join would have done.

Repair may run while workers run. Each lane is rebuilt under its lane lock (the lock
joins take to supersede), from SQL read again under that lock. Completing an action
releases its lane without that lock, so after the rebuild the current action's status
is read once more: if it became final meanwhile, the lane is released as the completion
would have done, and the action promoted then is resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .effects import Effects
from .join import status_of
from .lanes import LaneOutcome, Lanes
from .models import Action
from .statuses import ActionStatus
from .superseding import LaneEntry

__all__ = ["LaneRebuild", "LaneRepair", "plan_lane"]

PENDING, PERFORMING = ActionStatus.PENDING.value, ActionStatus.PERFORMING.value


@dataclass
class LaneRepair:
    """One lane as SQL says it must be, and how Redis differed."""

    key: str
    current_id: int | None
    pending_id: int | None
    superseded: list[int] = field(default_factory=list)
    found_current_id: int | None = None
    found_pending_ids: list[int] = field(default_factory=list)
    #: A worker rebuilt the lane after Redis lost it: the messages Redis lost with it
    #: (its current action's timeout) are sent again.
    recovered: bool = False

    @property
    def superseder(self) -> int | None:
        """The action the older pending ones are superseded by: the newest in the lane."""
        return self.pending_id if self.pending_id is not None else self.current_id

    def describe(self) -> str:
        """One line for the report."""
        if self.current_id is None and self.pending_id is None:
            return f"lane {self.key!r}: no open action in SQL, remove it from Redis"
        found = _lane_text(self.found_current_id, self.found_pending_ids)
        wanted = _lane_text(self.current_id, [] if self.pending_id is None else [self.pending_id])
        line = f"lane {self.key!r}: {found} -> {wanted}"
        if self.recovered:
            line += " (rebuilt by a worker after Redis lost it)"
        if self.superseded:
            ids = ", ".join(str(i) for i in self.superseded)
            line += f"; supersede older pending action(s) {ids} by {self.superseder}"
        return line


def plan_lane(
    key: str, rows: list[Any], found: tuple[int | None, list[int], bool], problems: list[str]
) -> LaneRepair | None:
    """The lane ``key`` as SQL's open ``rows`` say it must be (``found``: Redis's current
    and pending ids, and whether a worker rebuilt the lane); None when Redis agrees."""
    performing = [r.id for r in rows if r.status == PERFORMING]
    pending = [r.id for r in rows if r.status == PENDING]
    if len(performing) > 1:
        problems.append(
            f"lane {key!r} has {len(performing)} performing actions "
            f"({', '.join(map(str, performing))}); keeping {performing[0]} as current"
        )
    found_current, found_pending, recovered = found
    current = performing[0] if performing else None
    if current is None and found_current in pending:  # promoted, about to begin
        current = found_current
    waiting = [i for i in pending if i != current]
    newest = waiting.pop() if waiting else None
    if current is None:  # the newest is at the lane front: it performs next
        current, newest = newest, None
    older = waiting
    wanted_pending = [] if newest is None else [newest]
    if not (older or recovered) and (found_current, found_pending) == (current, wanted_pending):
        return None
    return LaneRepair(key, current, newest, older, found_current, found_pending, recovered)


class LaneRebuild:
    """Rebuilds one lane at a time under its lock (see the module's docstring)."""

    def __init__(
        self, session_factory: Callable[[], Session], lanes: Lanes, entry: LaneEntry
    ) -> None:
        self.session_factory = session_factory
        self.lanes = lanes
        self.entry = entry

    def open_rows(self, key: str | None = None) -> list[Any]:
        """Open actions (of lane ``key``, or of every lane), oldest first."""
        query = select(Action.id, Action.concurrency_key, Action.status, Action.checksum).where(
            Action.status.in_((PENDING, PERFORMING))
        )
        if key is not None:
            query = query.where(Action.concurrency_key == key)
        with self.session_factory() as s:
            return list(s.execute(query.order_by(Action.id)).all())

    def found(self, key: str) -> tuple[int | None, list[int], bool]:
        """Redis's current and pending ids of lane ``key``, and whether a worker rebuilt
        it after Redis lost it."""
        lane = self.lanes.get(key)
        recovered = self.lanes.recovered(key)
        return (lane.current_id, list(lane.pending_ids), recovered) if lane else (None, [], False)

    def rebuild(self, key: str, problems: list[str]) -> tuple[LaneRepair | None, Effects]:
        """Plan and apply lane ``key`` under its lock, from SQL read under it; the plan
        (None: Redis agreed) and what superseding left to do."""
        with self.lanes.locked(key):
            rows = self.open_rows(key)
            planned = plan_lane(key, rows, self.found(key), problems)
            if planned is None:
                return None, Effects()
            effects = Effects()
            if planned.superseded and planned.superseder is not None:
                effects = self.entry.supersede(planned.superseded, planned.superseder)
            checksums = {r.id: r.checksum for r in rows}
            current, pending = planned.current_id, planned.pending_id
            self.lanes.restore(
                key,
                None if current is None else (current, checksums[current]),
                None if pending is None else (pending, checksums[pending]),
            )
        effects.handoff += self._release_if_final(key, current)
        return planned, effects

    def _release_if_final(self, key: str, current: int | None) -> list[int]:
        """Release the lane when its restored current action completed meanwhile; the
        action promoted then (to resume)."""
        if current is None:
            return []
        with self.session_factory() as s:
            status = status_of(s, current)
        if status is None or not ActionStatus(status).is_final:
            return []
        outcome, promoted = self.lanes.release(key, current)
        return [promoted] if outcome is LaneOutcome.NEXT and promoted is not None else []


def _lane_text(current: int | None, pending: list[int]) -> str:
    if current is None and not pending:
        return "missing"
    waiting = ", ".join(str(i) for i in pending) or "none"
    return f"current {current if current is not None else 'none'}, pending {waiting}"
