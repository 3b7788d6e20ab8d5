"""Completing an action: its final status, after callbacks, achievement, report, lane.

:meth:`Completer.complete` is one transaction: the final status (a guarded ``UPDATE``,
so only one caller completes an action), every after callback in a savepoint of its
own, the achievement (an upsert) and the report to every waiting parent step, with a
``stepped.resume`` of the action staged as insurance for what follows the commit.
:meth:`Completer.finish` (idempotent) reports a final action to its waiting parents;
:meth:`Completer.release` moves its lane on.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import cached_property
from typing import Any, NamedTuple

from sqlalchemy import bindparam, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from .actors import ActorRegistry
from .effects import Delivery, Effects
from .errors import ActorNotFound
from .events import Events, Facts, logger
from .join import (
    changed,
    counted_steps_of_performing,
    report_parents,
    status_of,
    superseded_into,
)
from .messages import Message, advance_message, insurance_message
from .models import ACTIONS as _ACTIONS
from .models import Achievement, Action, ParentLink, Step
from .staging import stage
from .statuses import COMPLETION_STATUSES, ActionStatus, StepStatus
from .transition import Lookup, Transition

__all__ = ["Completer", "Settled", "Settler"]

OPEN = (ActionStatus.PENDING.value, ActionStatus.PERFORMING.value)
SUCCEEDED = ActionStatus.SUCCEEDED.value


class Settled(NamedTuple):
    """A completion written in the caller's transaction: the completed row (its
    columns as ``_set_final`` returns them), the parent steps now ready, the staged
    insurance entries."""

    row: Any
    ready: list[int]
    staged: list[int]
    at: datetime


class Settler:
    """The part of a completion that is written in the caller's transaction: shared by
    :class:`Completer` and by the last step of an action (``performing``), which
    completes it in the step's own transaction."""

    def __init__(self, actors: ActorRegistry, lookup: Lookup, events: Events) -> None:
        self.actors = actors
        self.lookup = lookup
        self.events = events

    def settle(
        self,
        s: Session,
        action_id: int,
        status: str,
        delivery: Delivery,
        now: datetime,
        began_at: datetime | None = None,
    ) -> Settled | None:
        """Final status, after callbacks, achievement, report to parents; no commit.
        None when the action was already final (``began_at``: it is still pending, and
        begins at that time in the same statement; None when it was not pending)."""
        row = _set_final(s, action_id, status, now, began_at)
        if row is None:
            return None
        failed = self._run_callbacks(s, action_id, status, row)
        successful = status == SUCCEEDED and not failed
        if successful and row.checksum is not None:
            _achieve(s, row.checksum_key, row.checksum, now)
        ready = report_parents(s, action_id, status, successful, now)
        return Settled(row, ready, stage(s, _insurance(action_id, ready, delivery), now), now)

    def settles_with(self, action: Action, step: Step, last: Delivery | None) -> bool:
        """Whether the last step ``step`` completes ``action`` in its own transaction (one
        commit for both): it closed at once as succeeded, inside a task, whose
        redelivery finishes a crash before the lane release (outside one, ``complete``
        releases the lane before its insurance entry is dropped). Not when the action
        has after callbacks: an unhandled exception in one rolls its completion back,
        and must not take the body's writes with it (the body would run again)."""
        if last is None or not last.in_worker or step.completed_at is None:
            return False
        if step.status != StepStatus.SUCCEEDED.value:
            return False
        return not self.callbacks(action.actor_type, action.name, SUCCEEDED)

    def announce(self, action_id: int, status: str, settled: Settled) -> None:
        """After the commit: the ``action_completed`` signal and log line."""
        self.events.action_completed(action_id, status, _facts(settled.row, settled.at))

    def callbacks(self, actor_type: str, name: str, status: str) -> list[Callable[..., Any]]:
        """The after callbacks a completion with ``status`` runs."""
        if status not in COMPLETION_STATUSES:
            return []
        return self.lookup(actor_type, name).after_callbacks(status)

    def _run_callbacks(self, s: Session, action_id: int, status: str, row: Any) -> int:
        """Run the after callbacks in ``s``, each in a savepoint; how many failed.

        A callback that raises a handled exception has its own changes rolled back and
        counts as failed; any other exception propagates (the caller rolls back).
        """
        callbacks = self.callbacks(row.actor_type, row.name, status)
        if not callbacks:
            return 0
        action = s.get_one(Action, action_id)
        action._load_actor = self.actors.load_ref
        try:
            actor = self.actors.load_ref(action.actor_type, action.actor_id, s)
            args = self.actors.load(action.arguments, s)
        except ActorNotFound as gone:  # nothing to call them on: they count as failed
            logger.warning("action #%s: %s: its after callbacks did not run", action_id, gone)
            action.after_callbacks_failed_count = len(callbacks)
            return len(callbacks)
        failed = 0
        for callback in callbacks:
            savepoint = s.begin_nested()
            try:
                callback(action, actor, *args)
                s.flush()
                savepoint.commit()
            except Exception as exc:
                savepoint.rollback()
                self.events.report_or_raise(exc, action_id, None, f"after_{status}")
                failed += 1
        action.after_callbacks_succeeded_count = len(callbacks) - failed
        action.after_callbacks_failed_count = failed
        return failed


class Completer(Transition):
    """The completion transition of one Stepped instance."""

    @cached_property
    def settler(self) -> Settler:
        """The in-transaction part of a completion."""
        return Settler(self.actors, self.lookup, self.events)

    def record_error(self, action_id: int, error: dict[str, Any]) -> None:
        """Put ``error`` on an open action (that is then failed from outside)."""
        with self.session_factory() as s:
            s.execute(
                update(Action)
                .where(Action.id == action_id, Action.status.in_(OPEN))
                .values(error=error)
            )
            s.commit()

    def complete(self, action_id: int, status: str, delivery: Delivery) -> tuple[bool, Effects]:
        """Give an open action its final status; ``(completed by this call, effects)``.

        One transaction: the final status, the after callbacks (each in a savepoint), the
        achievement and the report to every waiting parent step. A reader never sees the
        status without the callbacks' effects; an unhandled exception in a callback rolls
        it all back (the action stays open) and propagates. Completing an action that is
        already final redoes only the idempotent effects.
        """
        now = self.clock()
        with self.session_factory() as s:
            settled = self.settler.settle(s, action_id, status, delivery, now)
            s.commit()
        if settled is None:
            return False, self.finish(action_id, delivery)
        self.settler.announce(action_id, status, settled)
        effects = self.release(settled.row.concurrency_key, action_id).ready(*settled.ready)
        return True, effects.add(Effects(staged=settled.staged))

    def finish(self, action_id: int, delivery: Delivery) -> Effects:
        """Report a final action to its waiting parents and move its lane on (idempotent)."""
        with self.session_factory() as s:
            action = s.get(Action, action_id)
            if action is None or action.status in OPEN:
                return Effects()
            successful = action.status == SUCCEEDED and not action.after_callbacks_failed_count
            status, key = action.status, action.concurrency_key
            now = self.clock()
            ready = report_parents(s, action_id, status, successful, now)
            staged = stage(s, _insurance(None, ready, delivery), now)
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
                status = status_of(s, other)
            if status == ActionStatus.PENDING.value:
                effects.handoff.append(other)
            if status != ActionStatus.SUPERSEDED.value:
                return effects
            # At the lane front but superseded (before its superseder removed it from
            # the lane): it will never run, so release it too.
            action_id = other


def _insurance(action_id: int | None, ready: list[int], delivery: Delivery) -> list[Message]:
    """What must survive a crash right after the commit: outside a task (a web request
    completing an action), the report and lane release of the action and the advance of
    each ready step; inside a task its redelivery does that, so nothing."""
    if delivery.in_worker:
        return []
    resume = [] if action_id is None else [insurance_message(action_id)]
    return [*resume, *map(advance_message, ready)]


#: The final status of an open action (built once: a Core statement, no ORM work).
_SET_FINAL = (
    update(_ACTIONS)
    .where(_ACTIONS.c.id == bindparam("action_id"), _ACTIONS.c.status.in_(OPEN))
    .values(status=bindparam("final"), completed_at=bindparam("at"), updated_at=bindparam("at"))
    .returning(
        _ACTIONS.c.actor_type,
        _ACTIONS.c.actor_id,
        _ACTIONS.c.name,
        _ACTIONS.c.checksum,
        _ACTIONS.c.checksum_key,
        _ACTIONS.c.concurrency_key,
        _ACTIONS.c.started_at,
        _ACTIONS.c.root,
        _ACTIONS.c.request_id,
        _ACTIONS.c.canvas,
    )
)


#: The same for a pending action that begins and completes in one transaction.
_BEGIN_FINAL = _SET_FINAL.where(_ACTIONS.c.status == ActionStatus.PENDING.value).values(
    started_at=bindparam("began_at")
)


def _set_final(
    s: Session, action_id: int, status: str, now: datetime, began_at: datetime | None = None
) -> Any:
    """Give an open action its final status (once); its row, or None when it was final
    (``began_at``: only a pending one, performing since then)."""
    params = {"action_id": action_id, "final": status, "at": now}
    if began_at is None:
        return s.execute(_SET_FINAL, params).first()
    return s.execute(_BEGIN_FINAL, {**params, "began_at": began_at}).first()


def _facts(row: Any, now: datetime) -> Facts:
    """What the completion's log line says: ``trip on Car/1: performing -> failed in 2.0s``."""
    before = ActionStatus.PERFORMING if row.started_at else ActionStatus.PENDING
    actor = f"{row.actor_type}/{row.actor_id}"
    return Facts(
        row.name,
        actor,
        before,
        row.started_at,
        now,
        root=bool(row.root),
        request_id=row.request_id,
        canvas=row.canvas,
    )


def _achieve(s: Session, checksum_key: str, checksum: str, now: datetime) -> None:
    """Record the checksum under its key: one upsert, so two lanes sharing a checksum
    key that succeed at once never fail on the unique key."""
    values = {"checksum_key": checksum_key, "checksum": checksum, "created_at": now}
    dialect = s.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
        statement = insert(Achievement).values(**values)
        s.execute(
            statement.on_conflict_do_update(
                index_elements=[Achievement.checksum_key],
                set_={"checksum": checksum, "created_at": now},
            )
        )
        return
    updated = changed(
        s,
        update(Achievement)
        .where(Achievement.checksum_key == checksum_key)
        .values(checksum=checksum, created_at=now),
    )
    if not updated:
        s.add(Achievement(**values))


def _open_parent_steps(action_id: int) -> Any:
    """Steps this action (or one superseded into it) already reported to whose action
    still performs."""
    query = counted_steps_of_performing(ParentLink.action_id.in_(superseded_into(action_id)))
    return query.order_by(ParentLink.step_id)
