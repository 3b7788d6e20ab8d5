"""Healing: the lanes of pending actions that nothing would move on, found by the sweep.

A pending action moves on by a message or by its lane: it begins when it reaches its
lane's front (inline in the task that released the lane, or by ``stepped.resume``), or
it is superseded by a newer one. Two faults leave it with neither:

- the message that would begin it was lost (Redis, and the broker with it, lost data
  after the lane promoted it): it stays ``pending`` at the front of its lane, and every
  action behind it and every parent waiting on it waits forever;
- Redis lost its lane (a restart without persistence): it is in no lane at all, and no
  release will ever promote it.

``stepped repair`` fixes both, but only when an operator runs it. The outbox sweep that
every worker runs (at start and every ``stepped_outbox_sweep_every`` seconds) also runs
:meth:`Healing.heal`: it looks at pending actions older than the sweep's age, and at
their lanes. A suspect (at its lane's front, or in no lane) seen on two sweeps in a row
is healed: its lane is rebuilt from SQL under the lane's lock, as repair does, and the
lane's current action is resumed if it is still pending. A resume is idempotent (the
action begins once), so a suspect that was only slow costs one redundant message.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from .effects import Effects
from .events import logger
from .lane_repair import LaneRebuild
from .lanes import Lanes
from .models import Action
from .statuses import ActionStatus

__all__ = ["Healing"]

PENDING = ActionStatus.PENDING.value
#: Pending actions looked at per sweep (the oldest first).
BATCH = 500


class Healing:
    """Finds and heals stalled pending actions (see the module's docstring).

    One instance per Stepped instance; it remembers the suspects of the previous sweep
    of this process, so a suspect is healed only when a second sweep still finds it.
    """

    def __init__(
        self,
        session_factory: Callable[[], Session],
        lanes: Lanes,
        rebuild: LaneRebuild,
        clock: Callable[[], datetime],
    ) -> None:
        self.session_factory = session_factory
        self.lanes = lanes
        self.rebuild = rebuild
        self.clock = clock
        self._suspects: set[int] = set()

    def heal(self, older_than: float) -> Effects:
        """Heal the lanes of suspects seen twice; what is left to do: the lanes' current
        actions to resume (``handoff``) and what rebuilding them decided."""
        suspects = self.suspects(older_than)
        seen_before, self._suspects = self._suspects, {i for ids in suspects.values() for i in ids}
        effects = Effects()
        for key, ids in sorted(suspects.items()):
            again = sorted(ids & seen_before)
            if again:
                effects.add(self.heal_lane(key, again))
        return effects

    def suspects(self, older_than: float) -> dict[str, set[int]]:
        """Pending actions older than ``older_than`` seconds that are at their lane's
        front or in no lane, by concurrency key."""
        cutoff = self.clock() - timedelta(seconds=older_than)
        with self.session_factory() as s:
            rows = s.execute(
                select(Action.id, Action.concurrency_key)
                .where(Action.status == PENDING, Action.created_at <= cutoff)
                .order_by(Action.id)
                .limit(BATCH)
            ).all()
        by_key: dict[str, set[int]] = defaultdict(set)
        for row in rows:
            by_key[row.concurrency_key].add(row.id)
        found = {key: self._stalled(key, ids) for key, ids in by_key.items()}
        return {key: ids for key, ids in found.items() if ids}

    def _stalled(self, key: str, ids: set[int]) -> set[int]:
        """Those of ``ids`` (pending in SQL) that lane ``key`` would never move on: at
        its front, in no lane, or behind a current action that is no longer open."""
        lane = self.lanes.get(key)
        if lane is None:
            return ids
        waiting = ids & set(lane.pending_ids)
        if waiting and not self._open(lane.current_id):
            return ids
        return ids - waiting

    def _open(self, action_id: int | None) -> bool:
        if action_id is None:
            return False
        with self.session_factory() as s:
            status = s.scalar(select(Action.status).where(Action.id == action_id))
        return status is not None and not ActionStatus(status).is_final

    def heal_lane(self, key: str, ids: list[int]) -> Effects:
        """Rebuild lane ``key`` from SQL (under its lock) and resume its current action
        when it is still pending."""
        problems: list[str] = []
        planned, effects = self.rebuild.rebuild(key, problems)
        for problem in problems:
            logger.warning("stepped heal: %s", problem)
        current, _ = self.lanes.current_checksum(key)
        if current is not None and current not in effects.handoff:
            with self.session_factory() as s:
                status = s.scalar(select(Action.status).where(Action.id == current))
            if status == PENDING:
                effects.handoff.append(current)
        change = planned.describe() if planned is not None else f"lane {key!r} agreed with SQL"
        logger.warning(
            "stepped heal: pending action(s) %s had nothing to move them on: %s; resuming %s",
            ", ".join(map(str, ids)),
            change,
            ", ".join(map(str, effects.handoff)) or "nothing",
        )
        return effects
