"""Completing an action: its final status, after callbacks, achievement, report, lane.

:meth:`Completer.complete` gives an open action its final status once (a guarded
``UPDATE``). Without after callbacks or an achievement to write, the report to its
parent steps commits in that same transaction. Otherwise each after callback runs in
its own transaction with its count, so a redelivery resumes after the callbacks
already counted and runs none twice. :meth:`Completer.finish` (idempotent) reports a
final action to its waiting parents and releases its lane.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .actors import ActorRegistry
from .effects import Delivery, Effects
from .events import Events, Facts
from .join import changed, counted_steps_of_performing, report_parents
from .lanes import Lanes
from .messages import advance_message, insurance_message
from .models import Achievement, Action, ParentLink
from .staging import stage
from .statuses import COMPLETION_STATUSES, ActionStatus

if TYPE_CHECKING:
    from .definition import SteppedAction

__all__ = ["Completer"]

OPEN = (ActionStatus.PENDING.value, ActionStatus.PERFORMING.value)
SUCCEEDED = ActionStatus.SUCCEEDED.value
Lookup = Callable[[str, str], "SteppedAction[Any]"]


class Completer:
    """The completion transition of one Stepped instance."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        actors: ActorRegistry,
        lanes: Lanes,
        lookup: Lookup,
        events: Events,
        clock: Callable[[], datetime],
    ) -> None:
        self.session_factory = session_factory
        self.actors = actors
        self.lanes = lanes
        self.lookup = lookup
        self.events = events
        self.clock = clock

    def complete(self, action_id: int, status: str, delivery: Delivery) -> tuple[bool, Effects]:
        """Give an open action its final status; ``(completed by this call, effects)``.

        Completing an action that is already final redoes only the idempotent effects.
        """
        now = self.clock()
        with self.session_factory() as s:
            row = _set_final(s, action_id, status, now)
            if row is None:
                s.commit()
                return False, self.finish(action_id, delivery)
            callbacks = self._callbacks(row.actor_type, row.name, status)
            insurance = [insurance_message(action_id)]  # report and lane release: durable
            if not callbacks and not (status == SUCCEEDED and row.checksum is not None):
                # Nothing runs in between: tell the parents in the same transaction.
                ready = report_parents(s, action_id, status, status == SUCCEEDED, now)
                staged = stage(s, [*insurance, *map(advance_message, ready)], now)
                s.commit()
                self.events.action_completed(action_id, status, _facts(row, now))
                effects = self.release(row.concurrency_key, action_id).ready(*ready)
                return True, effects.add(Effects(staged=staged))
            staged = stage(s, insurance, now)
            s.commit()
        self.run_callbacks(action_id, status, callbacks)
        self.events.action_completed(action_id, status, _facts(row, now))
        return True, self.finish(action_id, delivery).add(Effects(staged=staged))

    def _callbacks(self, actor_type: str, name: str, status: str) -> list[Callable[..., Any]]:
        if status not in COMPLETION_STATUSES:
            return []
        return self.lookup(actor_type, name).after_callbacks(status)

    def run_callbacks(
        self, action_id: int, status: str, callbacks: list[Callable[..., Any]], start: int = 0
    ) -> None:
        """Run callbacks from ``start`` on, each in its own transaction; write the
        achievement when the action succeeded with a checksum and no callback failed."""
        for callback in callbacks[start:]:
            self._run_callback(action_id, status, callback)
        if status != SUCCEEDED:
            return
        with self.session_factory() as s:
            row = s.execute(
                select(
                    Action.checksum, Action.checksum_key, Action.after_callbacks_failed_count
                ).where(Action.id == action_id)
            ).one()
            if row.checksum is not None and not row.after_callbacks_failed_count:
                self._achieve(s, row.checksum_key, row.checksum)
                s.commit()

    def _run_callback(self, action_id: int, status: str, callback: Callable[..., Any]) -> None:
        with self.session_factory() as s:
            action = s.get_one(Action, action_id)
            action._load_actor = self.actors.load_ref
            actor = self.actors.load_ref(action.actor_type, action.actor_id, s)
            args = self.actors.load(action.arguments, s)
            try:
                callback(action, actor, *args)
                _count_callback(s, action_id, "after_callbacks_succeeded_count")
                s.commit()
                return
            except Exception as exc:
                s.rollback()
                error = exc
        with self.session_factory() as counting:
            _count_callback(counting, action_id, "after_callbacks_failed_count")
            counting.commit()
        self.events.report_or_raise(error, action_id, None, f"after_{status}")

    def resume_callbacks(self, action_id: int) -> None:
        """A redelivery: run the after callbacks a crashed first run never got to."""
        with self.session_factory() as s:
            row = s.execute(
                select(
                    Action.status,
                    Action.actor_type,
                    Action.name,
                    Action.after_callbacks_succeeded_count,
                    Action.after_callbacks_failed_count,
                ).where(Action.id == action_id)
            ).first()
        if row is None or row.status not in COMPLETION_STATUSES:
            return
        callbacks = self.lookup(row.actor_type, row.name).after_callbacks(row.status)
        counted = row.after_callbacks_succeeded_count + row.after_callbacks_failed_count
        if counted < len(callbacks):
            self.run_callbacks(action_id, row.status, callbacks, start=counted)

    def _achieve(self, s: Session, checksum_key: str, checksum: str) -> None:
        now = self.clock()
        updated = changed(
            s,
            update(Achievement)
            .where(Achievement.checksum_key == checksum_key)
            .values(checksum=checksum, created_at=now),
        )
        if not updated:
            s.add(Achievement(checksum_key=checksum_key, checksum=checksum, created_at=now))

    def finish(self, action_id: int, delivery: Delivery) -> Effects:
        """Report a final action to its waiting parents and move its lane on (idempotent)."""
        if delivery.recovering:
            self.resume_callbacks(action_id)
        with self.session_factory() as s:
            action = s.get(Action, action_id)
            if action is None or action.status in OPEN:
                return Effects()
            successful = action.status == SUCCEEDED and not action.after_callbacks_failed_count
            status, key = action.status, action.concurrency_key
            now = self.clock()
            ready = report_parents(s, action_id, status, successful, now)
            staged = stage(s, map(advance_message, ready), now)
            if delivery.recovering:
                ready.extend(s.scalars(_open_parent_steps(action_id)).all())
            s.commit()
        # Also when superseded: it may have reached the lane front before its superseder
        # removed it (superseding writes SQL first), and then it must release the lane.
        effects = self.release(key, action_id).ready(*dict.fromkeys(ready))
        return effects.add(Effects(staged=staged))

    def release(self, key: str, action_id: int) -> Effects:
        """Release ``action_id``'s place in its lane; the next pending action performs."""
        effects = Effects()
        while True:
            outcome, other = self.lanes.release(key, action_id)
            if outcome not in ("next", "empty"):
                self.lanes.leave(key, action_id)
            if other is None or outcome not in ("next", "other"):
                return effects
            with self.session_factory() as s:
                status = s.scalar(select(Action.status).where(Action.id == other))
            if status == ActionStatus.PENDING.value:
                effects.handoff.append(other)
            if status != ActionStatus.SUPERSEDED.value:
                return effects
            # At the lane front but superseded (before its superseder removed it from
            # the lane): it will never run, so release it too.
            action_id = other


def _set_final(s: Session, action_id: int, status: str, now: datetime) -> Any:
    """Give an open action its final status (once); its row, or None when it was final."""
    done = changed(
        s,
        update(Action)
        .where(Action.id == action_id, Action.status.in_(OPEN))
        .values(status=status, completed_at=now, updated_at=now),
    )
    if not done:
        return None
    return s.execute(
        select(
            Action.actor_type,
            Action.actor_id,
            Action.name,
            Action.checksum,
            Action.concurrency_key,
            Action.started_at,
        ).where(Action.id == action_id)
    ).one()


def _facts(row: Any, now: datetime) -> Facts:
    """What the completion's log line says: ``trip on Car/1: performing -> failed in 2.0s``."""
    before = ActionStatus.PERFORMING if row.started_at else ActionStatus.PENDING
    return Facts(row.name, f"{row.actor_type}/{row.actor_id}", before, row.started_at, now)


def _count_callback(s: Session, action_id: int, column: str) -> None:
    counter = getattr(Action, column)
    s.execute(
        update(Action)
        .where(Action.id == action_id)
        .values({column: counter + 1})
        .execution_options(synchronize_session=False)
    )


def _open_parent_steps(action_id: int) -> Any:
    """Steps this action already reported to whose action still performs."""
    query = counted_steps_of_performing(ParentLink.action_id == action_id)
    return query.order_by(ParentLink.step_id)
