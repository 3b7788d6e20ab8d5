"""The step's chord join, counted in SQL: each member once, never expiring.

A step waits on its members through :class:`~celery_stepped.models.ParentLink` rows
(a child action, a timed wait or a plain task). A member's outcome is counted by
one guarded ``UPDATE`` of its link (``waiting -> done``), in the same transaction as
the decrement of the step's ``pending_actions_count``; so a member delivered twice,
or two members finishing at once on two workers, count exactly once, and exactly one
of them sees the count reach zero: that one returns the step as ready.

Every function here works inside the caller's session and does not commit.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from .effects import Effects
from .messages import advance_message
from .models import Action, ParentLink, Step
from .staging import stage
from .statuses import ActionStatus, LinkKind, LinkState, StepStatus

__all__ = [
    "changed",
    "close_step",
    "count_member",
    "counted_steps_of_performing",
    "finish_link",
    "report_link",
    "report_parents",
    "retire_link",
    "transfer_links",
    "waits_on",
]

WAITING = LinkState.WAITING.value


def changed(session: Session, statement: Any) -> int:
    """Execute an UPDATE/DELETE and return how many rows it changed."""
    result = cast(CursorResult[Any], session.execute(statement))
    return int(result.rowcount)


def count_member(s: Session, step_id: int, successful: bool) -> int | None:
    """Count one outcome for the step; the step id when it was the last member."""
    pending = s.execute(
        update(Step)
        .where(Step.id == step_id)
        .values(
            pending_actions_count=Step.pending_actions_count - 1,
            unsuccessful_actions_count=Step.unsuccessful_actions_count + (0 if successful else 1),
        )
        .returning(Step.pending_actions_count)
    ).scalar_one()
    return step_id if pending == 0 else None


def finish_link(
    s: Session, link_id: int, outcome: str, successful: bool, now: datetime
) -> int | None:
    """Count one member's outcome, once; the step id if it was the last one."""
    step_id = s.execute(
        update(ParentLink)
        .where(ParentLink.id == link_id, ParentLink.state == WAITING)
        .values(state=LinkState.DONE.value, outcome=outcome, updated_at=now)
        .returning(ParentLink.step_id)
    ).scalar()
    return None if step_id is None else count_member(s, step_id, successful)


def report_parents(
    s: Session, action_id: int, status: str, successful: bool, now: datetime
) -> list[int]:
    """Count the outcome for every step still waiting on the action (once each)."""
    step_ids = s.scalars(
        update(ParentLink)
        .where(ParentLink.action_id == action_id, ParentLink.state == WAITING)
        .values(state=LinkState.DONE.value, outcome=status, updated_at=now)
        .returning(ParentLink.step_id)
        .execution_options(synchronize_session=False)
    ).all()
    ready = [count_member(s, step_id, successful) for step_id in step_ids]
    return [step_id for step_id in ready if step_id is not None]


def close_step(s: Session, step_id: int, now: datetime) -> str | None:
    """Close an open step whose members all reported; its status, or None if it was
    closed already (or still waits).

    A step is open until ``completed_at`` is set. It fails when a member was
    unsuccessful or when its body set ``step.status = "failed"`` (that step is
    ``failed`` from the start, as in Stepped, and closes once its members are final).
    """
    row = s.execute(
        select(Step.status, Step.unsuccessful_actions_count).where(Step.id == step_id)
    ).first()
    if row is None:
        return None
    failed = row.unsuccessful_actions_count or row.status == StepStatus.FAILED.value
    status = StepStatus.FAILED.value if failed else StepStatus.SUCCEEDED.value
    closed = changed(
        s,
        update(Step)
        .where(
            Step.id == step_id,
            Step.completed_at.is_(None),
            Step.pending_actions_count <= 0,
        )
        .values(status=status, completed_at=now),
    )
    return status if closed else None


def retire_link(link_id: int, state: LinkState, outcome: str, now: datetime) -> Any:
    """UPDATE ending a waiting link without counting it (guarded: once)."""
    return (
        update(ParentLink)
        .where(ParentLink.id == link_id, ParentLink.state == WAITING)
        .values(state=state.value, outcome=outcome, updated_at=now)
    )


def transfer_links(s: Session, old: int, newcomer: int, now: datetime) -> list[int]:
    """Make ``old``'s waiting parent steps wait on ``newcomer``; the steps now ready.

    The step that started ``old`` keeps that link as its record (``transferred``) and
    gains a copy waiting on the newcomer; links already carried over from earlier
    superseded actions move in place (one statement). A step that already waits on the
    newcomer gives the old slot up (``released``, counted as done).
    """
    ready = _release_duplicates(s, old, newcomer, now)
    _copy_starter_links(s, old, newcomer, now)
    s.execute(
        update(ParentLink)
        .where(ParentLink.action_id == old, ParentLink.state == WAITING)
        .values(action_id=newcomer, updated_at=now)
    )
    return ready


def _release_duplicates(s: Session, old: int, newcomer: int, now: datetime) -> list[int]:
    """Slots on ``old`` of steps that already wait on ``newcomer``: released, counted."""
    on_newcomer = select(ParentLink.step_id).where(
        ParentLink.action_id == newcomer, ParentLink.state == WAITING
    )
    released = s.execute(
        select(ParentLink.id, ParentLink.step_id).where(
            ParentLink.action_id == old,
            ParentLink.state == WAITING,
            ParentLink.step_id.in_(on_newcomer),
        )
    ).all()
    ready = []
    superseded = ActionStatus.SUPERSEDED.value
    for link_id, step_id in released:
        if changed(s, retire_link(link_id, LinkState.RELEASED, superseded, now)):
            ready.append(count_member(s, step_id, successful=True))
    return [step_id for step_id in ready if step_id is not None]


def _copy_starter_links(s: Session, old: int, newcomer: int, now: datetime) -> None:
    """The starter step's own link stays as its record; a copy waits on the newcomer."""
    ancestry = s.scalar(select(Action.ancestry).where(Action.id == old)) or ","
    starter = int(ancestry.rstrip(",").rsplit(",", 1)[-1]) if ancestry != "," else None
    own = s.execute(
        select(ParentLink.id, ParentLink.step_id, ParentLink.call)
        .join(Step, Step.id == ParentLink.step_id)
        .where(ParentLink.action_id == old, ParentLink.state == WAITING, Step.action_id == starter)
    ).all()
    superseded = ActionStatus.SUPERSEDED.value
    for link_id, step_id, call in own:
        if changed(s, retire_link(link_id, LinkState.TRANSFERRED, superseded, now)):
            s.add(
                ParentLink(
                    step_id=step_id,
                    action_id=newcomer,
                    kind=LinkKind.ACTION.value,
                    state=WAITING,
                    call=call,
                    created_at=now,
                    updated_at=now,
                )
            )


def counted_steps_of_performing(*where: Any) -> Any:
    """SELECT the steps of already counted links whose action still performs.

    A redelivered message follows them up (advancing a step is idempotent): the run
    that died may have counted the last member and never advanced the step.
    """
    return (
        select(ParentLink.step_id)
        .join(Step, Step.id == ParentLink.step_id)
        .join(Action, Action.id == Step.action_id)
        .where(
            ParentLink.state == LinkState.DONE.value,
            Action.status == ActionStatus.PERFORMING.value,
            *where,
        )
    )


def report_link(
    session_factory: Callable[[], Session],
    link_id: int,
    outcome: str,
    successful: bool,
    now: datetime,
) -> Effects:
    """Count one member in a transaction of its own; the step if it was the last one,
    with its ``stepped.advance`` staged in that transaction."""
    with session_factory() as s:
        ready = finish_link(s, link_id, outcome, successful, now)
        staged = stage(s, [] if ready is None else [advance_message(ready)], now)
        s.commit()
    return Effects(staged=staged).ready(ready)


def waits_on(s: Session, action_id: int, target: int) -> bool:
    """True when ``target`` waits on ``action_id`` through any chain of parent steps.

    Every parent counts: the step that started it, and those gained by sharing it
    (checksum) or by superseding (their links were transferred to it). One recursive
    query at any depth.
    """
    waiting = LinkState.WAITING.value
    up = (
        select(Step.action_id.label("action_id"))
        .join(ParentLink, ParentLink.step_id == Step.id)
        .where(ParentLink.action_id == action_id, ParentLink.state == waiting)
        .cte("up", recursive=True)
    )
    up = up.union(
        select(Step.action_id)
        .join(ParentLink, ParentLink.step_id == Step.id)
        .join(up, ParentLink.action_id == up.c.action_id)
        .where(ParentLink.state == waiting)
    )
    return s.scalar(select(up.c.action_id).where(up.c.action_id == target).limit(1)) is not None
