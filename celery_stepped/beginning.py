"""``pending -> performing``: the statement, the timeout it schedules, and what a step
body's transaction carries along (:data:`Along`).

An action the same call has just written (a child's start, ``now()``) and that its
lane let in at once, or that a lane hands on (its row read once), begins in the
transaction of its first step body (:class:`Fresh`): one commit, and the row and the
actor the start loaded are used again, not read back. Otherwise (a checksum, whose
achievement the begin checks; an action a redelivery finds) it begins in its own
transaction. The begin is written after the body on SQLite (no write
lock is held while it runs) and before it on PostgreSQL (the row lock makes a second
delivery wait), as every body's writes are. Likewise a step whose members all
reported is closed in its next body's transaction (:class:`Closing`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import bindparam, delete, inspect, select, update
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from .database import on_sqlite
from .effects import Delivery, Effects
from .events import Events
from .join import close_step
from .messages import Message, timeout_message
from .models import ACTIONS as _ACTIONS
from .models import Achievement, Action, action_of_row
from .staging import stage
from .statuses import ActionStatus, StepStatus

__all__ = [
    "BEGIN",
    "Along",
    "Began",
    "Beginner",
    "Closing",
    "Fresh",
    "Unbegun",
    "attach_row",
    "begin_row",
]

PENDING, PERFORMING = ActionStatus.PENDING.value, ActionStatus.PERFORMING.value

#: pending -> performing, returning what the first step needs (built once: Core).
BEGIN = (
    update(_ACTIONS)
    .where(_ACTIONS.c.id == bindparam("action_id"), _ACTIONS.c.status == PENDING)
    .values(status=PERFORMING, started_at=bindparam("at"), updated_at=bindparam("at"))
    .returning(
        _ACTIONS.c.name,
        _ACTIONS.c.timeout_seconds,
        _ACTIONS.c.checksum_key,
        _ACTIONS.c.actor_type,
        _ACTIONS.c.actor_id,
        _ACTIONS.c.checksum,
        _ACTIONS.c.outbound,
    )
)


class Began(NamedTuple):
    """What :data:`BEGIN` returned for an action it moved to performing."""

    name: str
    timeout_seconds: float | None
    checksum_key: str
    actor_type: str
    actor_id: str
    checksum: str | None
    outbound: bool

    def timeout_messages(self, action_id: int, queue: str | None) -> list[Message]:
        """The message that times the action out, if it has a timeout."""
        if self.timeout_seconds is None:
            return []
        return [timeout_message(action_id, self.name, self.timeout_seconds, queue)]


def begin_row(s: Session, action_id: int, now: datetime) -> Began | None:
    """pending -> performing in ``s`` (no commit); None when it was not pending."""
    row = s.execute(BEGIN, {"action_id": action_id, "at": now}).first()
    return None if row is None else Began(*row)


class Unbegun(Exception):
    """A fresh action was not pending any more when its first step began it: another
    delivery moved it on. The caller takes the ordinary path (it reads the action)."""


@dataclass
class Fresh:
    """A pending action whose every column the current call holds (its ``INSERT ...
    RETURNING`` wrote them, or ``Engine.carry_on`` read them: a lane's next action) and
    the actor its start loaded (None: load it)."""

    action: Action
    actor: Any = None

    def attach(self, s: Session, now: datetime) -> Action:
        """The action as a persistent object of ``s``, performing since ``now``, without
        a read (its own object stays with the caller, untouched)."""
        row = {c.key: getattr(self.action, c.key) for c in _ACTIONS.columns}
        # Pending: no steps yet (parent_steps: loaded if read).
        return attach_row(s, row, steps=[], status=PERFORMING, started_at=now)

    def actor_in(self, s: Session) -> Any:
        """The actor the start loaded, now in ``s``; None when it must be loaded (it is
        attached elsewhere, was never loaded, or has expired attributes)."""
        if self.actor is None:
            return None
        state = inspect(self.actor, raiseerr=False)
        if state is None:  # not a mapped object: a custom loader's actor, used as is
            return self.actor
        if not state.detached or state.expired_attributes:
            return None
        s.add(self.actor)
        return self.actor


@dataclass
class Closing:
    """A step whose members all reported, closed (as succeeded) in the transaction of
    the next step's body: one commit for both. Only a step that will succeed is closed
    so (the caller read its counts): a failing one fails its action instead."""

    step_id: int
    #: SQLite: the action's row as the read that found the step closing gave it, so the
    #: next body does not read it again (``step_index.advance_position``).
    row: dict[str, Any] | None = None

    def attach(self, s: Session) -> Action | None:
        """The action of ``row`` as a persistent object of ``s`` (None: no row: read it)."""
        return None if self.row is None else attach_row(s, self.row)


def attach_row(s: Session, row: dict[str, Any], **committed: Any) -> Action:
    """An action whose every column is in ``row`` as a persistent object of ``s``, without
    a read (:func:`~celery_stepped.models.action_of_row`); ``committed``: attributes to
    set as if loaded."""
    action = action_of_row(row)
    make_transient_to_detached(action)
    for key, value in committed.items():
        set_committed_value(action, key, value)
    s.add(action)
    return action


#: What a step's transaction carries along with the body: begin a fresh action, or
#: close the step before it.
Along = Fresh | Closing | None


class Beginner:
    """The begin transition of one Stepped instance (``queue_of``: an action's queue,
    where its timeout goes), and what a step's transaction carries along (:data:`Along`)."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        queue_of: Callable[[str, str], str | None],
        events: Events,
        clock: Callable[[], datetime],
    ) -> None:
        self.session_factory = session_factory
        self.queue_of = queue_of
        self.events = events
        self.clock = clock

    def begin(self, action_id: int, delivery: Delivery) -> Effects | None:
        """pending -> performing; erase the achievement; schedule the timeout.

        Returns the effects, or None when the action is not (or no longer) performing.
        """
        now = self.clock()
        with self.session_factory() as s:
            began = begin_row(s, action_id, now)
            if began is None:
                return self._began_before(s, action_id, delivery)
            checksum, checksum_key = began.checksum, began.checksum_key
            if checksum is not None and _achieved(s, checksum_key) == checksum:
                # Identical work succeeded while this one waited in its lane: skip it.
                s.rollback()
                return Effects(complete=[(action_id, ActionStatus.SUCCEEDED.value)])
            if checksum is not None:  # reuse is opt-in: only a checksum erases one
                s.execute(delete(Achievement).where(Achievement.checksum_key == checksum_key))
            effects = Effects(began.timeout_messages(action_id, self.queue(began)))
            effects.staged = stage(s, effects.messages, now)
            s.commit()
        self.started(action_id, began)
        effects.began = (began.actor_type, began.name, began.outbound)
        return effects

    def queue(self, began: Began) -> str | None:
        return self.queue_of(began.actor_type, began.name)

    def started(self, action_id: int, began: Began | Action) -> None:
        self.events.action_started(action_id, began.name, f"{began.actor_type}/{began.actor_id}")

    def fresh(self, s: Session, fresh: Fresh, now: datetime) -> list[Message]:
        """Begin ``fresh`` in ``s``: its timeout message (Unbegun: not pending)."""
        began = begin_row(s, fresh.action.id, now)
        if began is None:
            s.rollback()
            raise Unbegun(fresh.action.id)
        return began.timeout_messages(fresh.action.id, self.queue(began))

    def before_body(self, s: Session, along: Along, now: datetime) -> list[Message]:
        """What ``along`` writes before the body: a fresh action begins there on
        PostgreSQL (its row lock makes a second delivery wait); SQLite waits for the body."""
        if isinstance(along, Fresh) and not on_sqlite(s):
            return self.fresh(s, along, now)
        return []

    @staticmethod
    def folds(s: Session, along: Along) -> bool:
        """Whether ``along`` is a fresh action that, on SQLite, may begin in the UPDATE that
        completes it (its begin comes after the body there: nothing was written yet)."""
        return isinstance(along, Fresh) and on_sqlite(s)

    def after_body(
        self, s: Session, along: Along, now: datetime, rolled_back: bool = False
    ) -> list[Message] | None:
        """What ``along`` writes after the body (``rolled_back``: the body failed and its
        transaction, with anything written before it, rolled back). None: the step does
        not run (``s`` rolled back): another delivery closed the step before it, and
        runs this one."""
        if isinstance(along, Fresh) and (rolled_back or on_sqlite(s)):
            return self.fresh(s, along, now)
        closed = close_step(s, along.step_id, now) if isinstance(along, Closing) else None
        if isinstance(along, Closing) and closed != StepStatus.SUCCEEDED.value:
            s.rollback()
            return None
        return []

    def committed(self, along: Along) -> None:
        """After the step's commit: the signals of what ``along`` wrote."""
        if isinstance(along, Fresh):
            self.started(along.action.id, along.action)
        elif isinstance(along, Closing):
            self.events.step_completed(along.step_id, StepStatus.SUCCEEDED.value)

    @staticmethod
    def _began_before(s: Session, action_id: int, delivery: Delivery) -> Effects | None:
        row = s.execute(
            select(Action.status, Action.name, Action.timeout_seconds).where(Action.id == action_id)
        ).first()
        if row is None or row.status != PERFORMING:
            return None
        effects = Effects()
        if row.timeout_seconds is not None and delivery.recovering:
            # The run that began it may have died before it scheduled the timeout;
            # an early check re-schedules itself for the time left.
            effects.messages.append(timeout_message(action_id, row.name, 0))
        return effects


def _achieved(s: Session, checksum_key: str) -> str | None:
    return s.scalar(select(Achievement.checksum).where(Achievement.checksum_key == checksum_key))
