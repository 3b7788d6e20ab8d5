"""``Action.current_step_index``: the step an action is at.

As in Stepped, it is the index of the step performing, or of the last step that ran:
it moves to a step in the transaction that writes that step's row and never runs
past the last step (a one-step action ends at 0). Whether that step closed is on its
:class:`~celery_stepped.models.Step` row.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import Table, and_, bindparam, exists, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .database import on_sqlite
from .models import ACTIONS as _ACTIONS
from .models import LINKS as _LINKS
from .models import STEPS as _STEPS
from .models import Action, ParentLink, Step
from .statuses import ActionStatus, StepStatus

if TYPE_CHECKING:
    from .step import Step as StepContext

__all__ = [
    "Position",
    "advance_position",
    "insert_links",
    "insert_step",
    "move_index",
    "new_step_row",
    "position_of",
    "position_of_step",
    "ran_every_step",
    "step_exists",
    "step_to_run",
    "write_failed_step",
]


class Position(NamedTuple):
    """Where a performing action stands: its row and the row of its current step."""

    action_status: str
    actor_type: str
    name: str
    outbound: bool
    step_index: int
    step_id: int | None
    step_status: str | None
    pending: int | None
    step_open: bool | None  # no completed_at: it waits on members
    #: A member was unsuccessful, or its body set it failed: it closes as failed.
    failing: bool | None = None

    def closes_with_next(self, step_id: int, step_count: int) -> bool:
        """Whether the step ``step_id``, whose members all reported, closes in its next
        body's transaction (``beginning.Closing``): it is the action's open current
        step, it will succeed, and a step follows it."""
        return (
            self.action_status == ActionStatus.PERFORMING.value
            and self.step_id == step_id
            and bool(self.step_open)
            and not self.pending
            and not self.failing
            and self.step_index + 1 < step_count
        )


_CURRENT = _STEPS.alias("current_step")
#: What a position reads: the action's row and the row of the step at its index.
_POSITION_COLUMNS = (
    _ACTIONS.c.status,
    _ACTIONS.c.actor_type,
    _ACTIONS.c.name,
    _ACTIONS.c.outbound,
    _ACTIONS.c.current_step_index,
    _CURRENT.c.id,
    _CURRENT.c.status,
    _CURRENT.c.pending_actions_count,
    _CURRENT.c.completed_at.is_(None),
    or_(
        _CURRENT.c.unsuccessful_actions_count > 0,
        _CURRENT.c.status == StepStatus.FAILED.value,
    ),
)
_AT_INDEX = and_(
    _CURRENT.c.action_id == _ACTIONS.c.id,
    _CURRENT.c.definition_index == _ACTIONS.c.current_step_index,
)
_POSITION = (
    select(*_POSITION_COLUMNS)
    .select_from(_ACTIONS.outerjoin(_CURRENT, _AT_INDEX))
    .where(_ACTIONS.c.id == bindparam("action_id"))
)
_GIVEN = _STEPS.alias("given_step")
#: The same, found from one of the action's steps (its action id first).
_POSITION_OF_STEP = (
    select(_GIVEN.c.action_id, *_POSITION_COLUMNS)
    .select_from(
        _GIVEN.join(_ACTIONS, _ACTIONS.c.id == _GIVEN.c.action_id).outerjoin(_CURRENT, _AT_INDEX)
    )
    .where(_GIVEN.c.id == bindparam("step_id"))
)


def position_of(s: Session, action_id: int) -> Position | None:
    """Where the action stands; None when it does not exist."""
    row = s.execute(_POSITION, {"action_id": action_id}).first()
    return None if row is None else Position(*row)


def position_of_step(s: Session, step_id: int) -> tuple[int, Position] | None:
    """``(action id, where it stands)`` for the action of ``step_id``; None if no step."""
    row = s.execute(_POSITION_OF_STEP, {"step_id": step_id}).first()
    return None if row is None else (row[0], Position(*row[1:]))


#: The same with the action's whole row after the position's columns.
_POSITION_AND_ROW_OF_STEP = _POSITION_OF_STEP.add_columns(*_ACTIONS.columns)
_SPLIT = 1 + len(_POSITION_COLUMNS)


def advance_position(
    s: Session, step_id: int
) -> tuple[tuple[int, Position] | None, dict[str, Any] | None]:
    """``position_of_step``, and on SQLite the action's row too (every column by key),
    read in the same statement: a step that closes with its next body hands it on
    (``Closing``), and that body does not read the action again (on PostgreSQL it takes
    the action's row lock with its read, ``step_to_run``)."""
    if not on_sqlite(s):
        return position_of_step(s, step_id), None
    row = s.execute(_POSITION_AND_ROW_OF_STEP, {"step_id": step_id}).first()
    if row is None:
        return None, None
    columns = dict(zip(_ACTIONS.columns.keys(), row[_SPLIT:], strict=True))
    return (row[0], Position(*row[1:_SPLIT])), columns


_MOVE_INDEX = (
    update(_ACTIONS)
    .where(_ACTIONS.c.id == bindparam("action_id"), _ACTIONS.c.current_step_index < bindparam("to"))
    .values(current_step_index=bindparam("to"), updated_at=bindparam("at"))
)


def move_index(s: Session, action_id: int, index: int, now: datetime) -> None:
    """Move ``current_step_index`` on to the step at ``index`` (never back)."""
    s.execute(_MOVE_INDEX, {"action_id": action_id, "to": index, "at": now})


def ran_every_step(s: Session, action_id: int, index: int, step_count: int) -> bool:
    """True when the action's steps all ran and succeeded: the step at its
    ``current_step_index`` is the last one and closed as succeeded (an index past the
    last step, left by earlier versions, counts as done too)."""
    if index != step_count - 1:
        return index >= step_count
    status = s.scalar(
        select(Step.status).where(Step.action_id == action_id, Step.definition_index == index)
    )
    return status == StepStatus.SUCCEEDED.value


_STEP_EXISTS = select(_STEPS.c.id).where(
    _STEPS.c.action_id == bindparam("action_id"), _STEPS.c.definition_index == bindparam("index")
)


def step_exists(s: Session, action_id: int, index: int) -> bool:
    """True when the step at ``index`` already has its row (its body ran)."""
    return s.execute(_STEP_EXISTS, {"action_id": action_id, "index": index}).first() is not None


def new_step_row(
    action_id: int, index: int, started: datetime, context: StepContext, now: datetime
) -> Step:
    """The Step row as the body left it: closed at once, or open while its members run
    (``step.status = "failed"`` still starts them, as in Stepped: failed from the start)."""
    members = len(context.members)
    if context.status == StepStatus.FAILED.value:
        status = StepStatus.FAILED.value
    else:
        status = StepStatus.PERFORMING.value if members else StepStatus.SUCCEEDED.value
    return Step(
        action_id=action_id,
        definition_index=index,
        status=status,
        pending_actions_count=members,
        started_at=started,
        completed_at=None if members else now,
    )


_INSERT_STEP = insert(_STEPS).returning(_STEPS.c.id)
_INSERT_LINKS = insert(_LINKS).returning(_LINKS.c.id, sort_by_parameter_order=True)
#: What a new link row is given (the same keys in every row of the one INSERT).
_LINK_KEYS = ("step_id", "kind", "state", "call", "action_id", "created_at", "updated_at")


def _row(table: Table, obj: Any) -> dict[str, Any]:
    state = obj.__dict__
    return {c.key: state[c.key] for c in table.columns if state.get(c.key) is not None}


def insert_step(s: Session, step: Step) -> None:
    """Write a new step's row (Core: ``step`` stays out of the session); sets its id."""
    step.id = s.execute(_INSERT_STEP, _row(_STEPS, step)).scalar_one()


def insert_links(s: Session, links: list[ParentLink]) -> None:
    """Write a step's member links in one statement; sets their ids."""
    if not links:
        return
    rows = [{key: getattr(link, key) for key in _LINK_KEYS} for link in links]
    ids = s.execute(_INSERT_LINKS, rows).scalars().all()
    for link, link_id in zip(links, ids, strict=True):
        link.id = link_id


def write_failed_step(
    s: Session, action_id: int, index: int, started: datetime, now: datetime, error: Any
) -> int | None:
    """Commit the row of a step whose body failed (the index moved on to it); its id, or
    None when another delivery wrote the step first."""
    step = Step(
        action_id=action_id,
        definition_index=index,
        status=StepStatus.FAILED.value,
        started_at=started,
        completed_at=now,
        error=error,
    )
    try:
        insert_step(s, step)
        move_index(s, action_id, index, now)
        s.commit()
    except IntegrityError:
        s.rollback()
        return None
    return step.id


#: SQLite: the action and whether the step at ``index`` has its row, in one statement.
_ACTION_AND_STEP = select(
    Action,
    exists()
    .where(Step.action_id == Action.id, Step.definition_index == bindparam("index"))
    .label("ran"),
).where(Action.id == bindparam("action_id"))


def step_to_run(s: Session, action_id: int, index: int) -> tuple[Action, bool]:
    """The action (row-locked on PostgreSQL) and whether its step at ``index`` ran.

    PostgreSQL reads the step after the lock is granted: a second delivery waits for
    the first one's commit and then sees its row (one statement's snapshot would
    predate the wait). SQLite has no row locks: one statement reads both.
    """
    if on_sqlite(s):
        action, ran = s.execute(_ACTION_AND_STEP, {"action_id": action_id, "index": index}).one()
        return action, bool(ran)
    action = s.get_one(Action, action_id, with_for_update=True)
    return action, step_exists(s, action_id, index)
