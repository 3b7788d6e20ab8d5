"""Lane entry: perform now, wait (superseding older pending actions) or deadlock.

Entering a lane spans Redis and SQL. Older pending actions become ``superseded`` in
SQL first (their waiting parent steps now wait on the newcomer: their links stay on the
superseded action and count when its chain of superseders ends), then leave the lane in
Redis (:meth:`~celery_stepped.lanes.Lanes.enter`), so a crash in between loses none
of them. Everything here returns :class:`~celery_stepped.effects.Effects` for the
engine to act on.

Redis may lose a lane (a restart without persistence) while its action still performs.
Before joining a lane that has no current action, :meth:`LaneEntry.recover` looks in
SQL for an action performing under that key and, under the lane's lock, makes it the
lane's current action again, so the newcomer waits behind it instead of performing
beside it. Pending actions the lost lane held are left to ``stepped repair``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.orm import Session

from .effects import Effects
from .errors import Deadlock
from .events import Events, Facts, logger
from .join import performing_under, status_of, supersede_links, waits_on
from .lanes import JoinResult, LaneOutcome, Lanes
from .models import ACTIONS as _ACTIONS
from .models import Action
from .statuses import ActionStatus

__all__ = ["Entry", "LaneEntry"]

PENDING = ActionStatus.PENDING.value
PERFORMING = ActionStatus.PERFORMING.value
#: Superseding one pending action (``:b_old`` by ``:b_newcomer``): prebuilt Core.
_SUPERSEDE = (
    update(_ACTIONS)
    .where(_ACTIONS.c.id == bindparam("b_old"), _ACTIONS.c.status == PENDING)
    .values(
        status=ActionStatus.SUPERSEDED.value,
        completed_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
        superseded_by_id=bindparam("b_newcomer"),
    )
    .returning(
        _ACTIONS.c.id,
        _ACTIONS.c.root,
        _ACTIONS.c.request_id,
        _ACTIONS.c.canvas,
        _ACTIONS.c.ancestry,
    )
)
#: Rebuilding a lane Redis lost (``recover``) starts from it (prebuilt Core); a new
#: action asks the same in its INSERT (``starting``).
_PERFORMING_IN_LANE = (
    performing_under(_ACTIONS, bindparam("b_key"))
    .add_columns(_ACTIONS.c.checksum)
    .where(_ACTIONS.c.id != bindparam("b_joining"))
)


@dataclass
class Entry:
    """What entering the lane decided, and the deadlock to report (if any)."""

    effects: Effects = field(default_factory=Effects)
    deadlock: Deadlock | None = None


@dataclass
class Superseded:
    """What superseding wrote: the superseded actions (with what their signal says) and
    whether the newcomer was final already when it committed."""

    facts: dict[int, Facts] = field(default_factory=dict)
    newcomer_final: bool = False


def _superseded_facts(row: Any, newcomer_id: int) -> Facts:
    """What the ``superseded`` signal and log line say (from the UPDATE's RETURNING)."""
    return Facts(
        "",
        "",
        "pending",
        superseded_by=newcomer_id,
        root=bool(row.root),
        request_id=row.request_id,
        canvas=row.canvas,
    )


class LaneEntry:
    """The lane-entry transition of one Stepped instance."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        lanes: Lanes,
        events: Events,
        clock: Callable[[], datetime],
    ) -> None:
        self.session_factory = session_factory
        self.lanes = lanes
        self.events = events
        self.clock = clock

    def enter(self, action: Action, fresh: bool = False, lane_clear: bool | None = None) -> Entry:
        """Enter ``action``'s lane (a pending, persisted action).

        ``fresh``: ``action`` is a root this call has just written; nothing can wait
        on it yet (no link names it, and no lane held it to be shared), so the deadlock
        check is skipped. ``lane_clear``: whether SQL had no action performing in the
        lane when ``action`` was written (``Starter.create`` reads it in its INSERT);
        when known, the lane is not read first: the join script answers ``lost`` (SQL
        has a performing action, Redis no lane: it is rebuilt, then entered as ever)
        or ``busy`` (another action is current: the deadlock check, then the join).
        """
        unwaited = fresh and action.root
        flags = ""
        if lane_clear is None:
            current = self._waiting_current(action, unwaited)
            if current is not None:  # its lane is held by an action that waits on it
                return Entry(Effects(finished=[action.id]), self._deadlock(action, current))
        else:
            flags = ("" if unwaited else "b") + ("" if lane_clear else "e")
        superseded = Superseded()

        def supersede(old_ids: list[int]) -> None:  # under the lane lock: SQL only
            done = self.supersede_rows(old_ids, action.id, final_yet=not fresh)
            superseded.facts.update(done.facts)
            superseded.newcomer_final = superseded.newcomer_final or done.newcomer_final

        result = self._join(action, supersede, flags)
        if result is None:  # Redis had lost the lane SQL performs in: rebuilt, enter as ever
            return self.enter(action, fresh)
        entry = Entry(self.after_supersede(superseded, action.id))
        if result.outcome == "deadlock":
            entry.deadlock = self._deadlock(action, result.current_id)
            entry.effects.finished.append(action.id)
        elif result.outcome == "perform":
            entry.effects.perform.append(action.id)
        return entry

    def _join(
        self, action: Action, supersede: Callable[[list[int]], None], flags: str
    ) -> JoinResult | None:
        """Join the lane (``flags``: see :meth:`enter`). None: Redis had lost it, and it
        is rebuilt now. A busy lane whose current action waits on ``action``: deadlock."""
        key = action.concurrency_key
        join = partial(self.lanes.enter, key, action.id, action.checksum, action.ancestry)
        result = join(supersede, flags)
        if result.outcome == LaneOutcome.LOST:
            self.recover(key, action.id)
            return None
        if result.outcome == LaneOutcome.BUSY:
            if self._waits(action, result.current_id):
                return JoinResult(LaneOutcome.DEADLOCK, current_id=result.current_id)
            result = join(supersede, "")
        return result

    def supersede(self, old_ids: list[int], newcomer_id: int) -> Effects:
        """Mark pending actions superseded by ``newcomer_id`` (repair, racing joins)."""
        return self.after_supersede(self.supersede_rows(old_ids, newcomer_id), newcomer_id)

    def supersede_rows(
        self, old_ids: list[int], newcomer_id: int, final_yet: bool = True
    ) -> Superseded:
        """Superseding in one SQL transaction; returns what it superseded.

        A constant number of rows per superseded action, however many it superseded
        itself: its status, and the link of the step that started it copied onto the
        newcomer (:func:`~celery_stepped.join.supersede_links`). Its other waiting links
        stay on it; the newcomer's completion counts them through ``superseded_by_id``.
        No step becomes ready here, so there is nothing to follow up. The newcomer's
        status is read after the commit (unless ``final_yet`` is False: a newcomer that
        is still entering its lane for the first time): if it completed before these
        actions were superseded into it, its report missed their waiting links.
        """
        superseded = Superseded()
        if not old_ids:
            return superseded
        now = self.clock()
        with self.session_factory() as s:
            for old in old_ids:
                params = {"b_old": old, "b_now": now, "b_newcomer": newcomer_id}
                row = s.execute(_SUPERSEDE, params).first()
                if row is not None:
                    superseded.facts[old] = _superseded_facts(row, newcomer_id)
                    supersede_links(s, old, newcomer_id, now, row.ancestry or "")
            s.commit()
            if superseded.facts and final_yet:
                status = status_of(s, newcomer_id)
                superseded.newcomer_final = status is not None and ActionStatus(status).is_final
        return superseded

    def after_supersede(self, superseded: Superseded, newcomer_id: int) -> Effects:
        """Signals and follow-ups of superseding (outside the lane lock)."""
        effects = Effects()
        for old, facts in superseded.facts.items():
            self.events.action_completed(old, ActionStatus.SUPERSEDED.value, facts)
        if superseded.newcomer_final:
            # It completed before these actions were superseded into it: reporting it
            # again counts their waiting links (each once: a guarded UPDATE).
            effects.finished.append(newcomer_id)
        return effects

    def recover(self, key: str, joining: int) -> int | None:
        """Rebuild ``key``'s lane when Redis lost it while an action performs in it.

        A lane exists as long as its current action performs (it is released only after
        the action is final in SQL), so an action performing under a lane with no
        current action means Redis lost the lane. It becomes current again, under the
        lane's lock and after reading SQL again under it, and only if no join recreated
        the lane meanwhile. Returns the lane's current action (None: none performs).
        """
        if self._performing(key, joining) is None:
            return None
        with self.lanes.locked(key):
            found = self._performing(key, joining)
            if found is not None and self.lanes.restore(key, found, None, only_if_missing=True):
                logger.warning(
                    "lane %r was missing in Redis while action #%s performs in it: rebuilt",
                    key,
                    found[0],
                )
        return self.lanes.current_checksum(key)[0]

    def _performing(self, key: str, joining: int) -> tuple[int, str | None] | None:
        """The oldest action performing under ``key`` (but ``joining``), with its checksum."""
        with self.session_factory() as s:
            row = s.execute(_PERFORMING_IN_LANE, {"b_key": key, "b_joining": joining}).first()
        return None if row is None else (row.id, row.checksum)

    def _waiting_current(self, action: Action, unwaited: bool = False) -> int | None:
        """The lane's current action when it waits on ``action`` through any parent
        (shared and superseded parents included): entering would wait forever. A lost
        lane is rebuilt first (:meth:`recover`). ``unwaited``: nothing can wait on
        ``action`` yet (only the rebuild is done)."""
        current, _ = self.lanes.current_checksum(action.concurrency_key)
        if current is None:
            current = self.recover(action.concurrency_key, action.id)
        return None if unwaited or not self._waits(action, current) else current

    def _waits(self, action: Action, current: int | None) -> bool:
        """True when ``current`` waits on ``action`` through any parent."""
        if current is None or current == action.id:
            return False
        with self.session_factory() as s:
            return bool(waits_on(s, action.id, current))

    def _deadlock(self, action: Action, current_id: int | None) -> Deadlock:
        with self.session_factory() as s:
            s.execute(
                update(Action)
                .where(Action.id == action.id, Action.status == PENDING)
                .values(status=ActionStatus.DEADLOCKED.value, completed_at=self.clock())
            )
            s.commit()
        action.status = ActionStatus.DEADLOCKED.value
        return Deadlock(
            f"{action.name} on {action.actor_type}/{action.actor_id} would wait for its "
            f"ancestor {current_id} in lane {action.concurrency_key!r}"
        )
