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

from sqlalchemy import (
    and_,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from .effects import Effects
from .messages import advance_message
from .models import ACTIONS as _ACTIONS
from .models import LINKS as _LINKS
from .models import STEPS as _STEPS
from .models import Action, ParentLink, Step
from .staging import stage
from .statuses import ActionStatus, LinkKind, LinkState, StepStatus

__all__ = [
    "chain_ends",
    "changed",
    "close_step",
    "count_member",
    "counted_steps_of_performing",
    "detached_action",
    "finish_link",
    "performing_under",
    "report_link",
    "report_parents",
    "retire_link",
    "status_of",
    "supersede_links",
    "superseded_into",
    "waits_on",
]

WAITING = LinkState.WAITING.value


def _superseded_chain(anchor: Any) -> Any:
    """Recursive CTE ``chain(id)``: the actions ``anchor`` selects and every action
    superseded into them, transitively (``superseded_by_id``, indexed)."""
    start = select(_ACTIONS.c.id.label("id")).where(anchor)
    chain = start.cte("chain", recursive=True)
    return chain.union(select(_ACTIONS.c.id).join(chain, _ACTIONS.c.superseded_by_id == chain.c.id))


def _prebuilt_report() -> Any:
    """The report to parents as one prebuilt Core UPDATE (built once: an ORM-enabled
    UPDATE costs several times its CPU): every waiting link on ``:b_action`` and on the
    actions superseded into it, transitively, becomes done with ``:b_outcome``."""
    chain = _superseded_chain(_ACTIONS.c.id == bindparam("b_action"))
    return (
        update(_LINKS)
        .where(_LINKS.c.action_id.in_(select(chain.c.id)), _LINKS.c.state == WAITING)
        .values(
            state=LinkState.DONE.value,
            outcome=bindparam("b_outcome"),
            updated_at=bindparam("b_now"),
        )
        .returning(_LINKS.c.step_id)
    )


_REPORT = _prebuilt_report()
#: One member's outcome counted on its step (``:b_step``, ``:b_failed`` 0 or 1).
_COUNT = (
    update(_STEPS)
    .where(_STEPS.c.id == bindparam("b_step"))
    .values(
        pending_actions_count=_STEPS.c.pending_actions_count - 1,
        unsuccessful_actions_count=_STEPS.c.unsuccessful_actions_count + bindparam("b_failed"),
    )
    .returning(_STEPS.c.pending_actions_count)
)


def changed(session: Session, statement: Any, params: dict[str, Any] | None = None) -> int:
    """Execute an UPDATE/DELETE (with ``params``) and return how many rows it changed."""
    result = cast(CursorResult[Any], session.execute(statement, params))
    return int(result.rowcount)


def count_member(s: Session, step_id: int, successful: bool) -> int | None:
    """Count one outcome for the step; the step id when it was the last member."""
    params = {"b_step": step_id, "b_failed": 0 if successful else 1}
    pending = s.execute(_COUNT, params).scalar_one()
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


def superseded_into(*action_ids: int) -> Any:
    """SELECT of these actions and of every action superseded into them, transitively.

    A superseded action keeps its parent links (only the starter step's link is copied
    onto its superseder): they wait on the end of its chain of superseders, found
    through ``superseded_by_id`` (indexed), one recursive query at any length.
    """
    return select(_superseded_chain(_ACTIONS.c.id.in_(sorted(action_ids))).c.id)


def chain_ends(action_ids: Any) -> Any:
    """SELECT the ends of the chains of superseders of these actions (a SELECT of ids).

    An action not superseded is its own end; the others follow ``superseded_by_id``
    forward (each action met once) to the one that was not superseded.
    """
    start = select(Action.id.label("id")).where(Action.id.in_(action_ids))
    walk = start.cte("walk", recursive=True)
    walk = walk.union(
        select(Action.superseded_by_id)
        .join(walk, Action.id == walk.c.id)
        .where(Action.superseded_by_id.is_not(None))
    )
    reached = Action.id.in_(select(walk.c.id))
    return select(Action.id).where(reached, Action.superseded_by_id.is_(None))


def report_parents(
    s: Session, action_id: int, status: str, successful: bool, now: datetime
) -> list[int]:
    """Count the outcome for every step still waiting on the action (once each).

    The links left on the actions superseded into it count too, with the same outcome:
    a superseded child is not an outcome, its step waits on the superseder. A step that
    waits on both through inherited links counts both slots (one that started both had
    the older slot released when superseding happened). A superseded action reports
    nothing itself: its links wait for the end of its chain.
    """
    if status == ActionStatus.SUPERSEDED.value:
        return []
    params = {"b_action": action_id, "b_outcome": status, "b_now": now}
    step_ids = s.scalars(_REPORT, params).all()
    ready = [count_member(s, step_id, successful) for step_id in step_ids]
    return [step_id for step_id in ready if step_id is not None]


def close_step(s: Session, step_id: int, now: datetime) -> str | None:
    """Close an open step whose members all reported; its status, or None if it was
    closed already (or still waits).

    A step is open until ``completed_at`` is set. It fails when a member was
    unsuccessful or when its body set ``step.status = "failed"`` (that step is
    ``failed`` from the start, as in Stepped, and closes once its members are final).
    """
    closed = s.execute(_CLOSE_STEP, {"b_step": step_id, "b_now": now}).first()
    return None if closed is None else str(closed.status)


#: Close a step (one statement: the status follows from its counts and its own status).
_CLOSE_STEP = (
    update(_STEPS)
    .where(
        _STEPS.c.id == bindparam("b_step"),
        _STEPS.c.completed_at.is_(None),
        _STEPS.c.pending_actions_count <= 0,
    )
    .values(
        status=case(
            (
                or_(
                    _STEPS.c.unsuccessful_actions_count > 0,
                    _STEPS.c.status == StepStatus.FAILED.value,
                ),
                StepStatus.FAILED.value,
            ),
            else_=StepStatus.SUCCEEDED.value,
        ),
        completed_at=bindparam("b_now"),
    )
    .returning(_STEPS.c.status)
)


_STATUS = select(_ACTIONS.c.status).where(_ACTIONS.c.id == bindparam("b_action"))


def performing_under(actions: Any, key: Any) -> Any:
    """The oldest action performing under concurrency key ``key`` (a bind parameter),
    read from ``actions`` (the table, or an alias of it): a lane's current action as SQL
    knows it, which a lane Redis lost is rebuilt from."""
    return (
        select(actions.c.id)
        .where(
            actions.c.concurrency_key == key,
            actions.c.status == ActionStatus.PERFORMING.value,
        )
        .order_by(actions.c.id)
        .limit(1)
    )


def status_of(s: Session, action_id: int) -> str | None:
    """One action's status (None: no such action): prebuilt Core, as several
    transitions ask it."""
    status: str | None = s.scalar(_STATUS, {"b_action": action_id})
    return status


def detached_action(s: Session, action_id: int) -> Action | None:
    """One action's row, detached from ``s`` (None: no such action)."""
    action = s.get(Action, action_id)
    if action is not None:
        s.expunge(action)
    return action


def retire_link(link_id: int, state: LinkState, outcome: str, now: datetime) -> Any:
    """UPDATE ending a waiting link without counting it (guarded: once)."""
    return (
        update(_LINKS)
        .where(_LINKS.c.id == link_id, _LINKS.c.state == WAITING)
        .values(state=state.value, outcome=outcome, updated_at=now)
    )


def supersede_links(
    s: Session, old: int, newcomer: int, now: datetime, ancestry: str | None = None
) -> None:
    """The links of ``old``, superseded by ``newcomer``: a constant number of rows.

    Every waiting link stays on ``old`` and is counted when the end of its chain of
    superseders completes (:func:`report_parents`). The step that started ``old`` keeps
    its link as its record (``transferred``) and gains a copy waiting on the newcomer,
    so it lists both among its ``actions``; when it waits on the newcomer already (it
    started both), its slot on ``old`` is released instead (API.md section 5), counted
    as done: the step still waits on the newcomer, so it cannot become ready here.
    """
    superseded = ActionStatus.SUPERSEDED.value
    for link_id, step_id, call, both in _starter_links(s, old, newcomer, ancestry):
        if both:
            if changed(s, retire_link(link_id, LinkState.RELEASED, superseded, now)):
                count_member(s, step_id, successful=True)
        elif changed(s, retire_link(link_id, LinkState.TRANSFERRED, superseded, now)):
            copy = {"step_id": step_id, "action_id": newcomer, "call": call}
            s.execute(_COPY_LINK, {**copy, "created_at": now, "updated_at": now})


def _starter_links(s: Session, old: int, newcomer: int, ancestry: str | None) -> list[Any]:
    """The waiting links of ``old`` on steps of the action that started it:
    ``(id, step_id, call, whether that step also waits on the newcomer)``.
    ``ancestry``: ``old``'s, when the caller has it (read otherwise)."""
    if ancestry is None:
        ancestry = s.scalar(_ANCESTRY, {"b_action": old})
    ancestry = ancestry or ","
    if ancestry == ",":
        return []
    starter = int(ancestry.rstrip(",").rsplit(",", 1)[-1])
    params = {"b_old": old, "b_newcomer": newcomer, "b_starter": starter}
    return list(s.execute(_STARTER_LINKS, params).all())


_ANCESTRY = select(_ACTIONS.c.ancestry).where(_ACTIONS.c.id == bindparam("b_action"))
_ON_NEWCOMER = select(_LINKS.c.step_id).where(
    _LINKS.c.action_id == bindparam("b_newcomer"), _LINKS.c.state == WAITING
)
_STARTER_LINKS = (
    select(_LINKS.c.id, _LINKS.c.step_id, _LINKS.c.call, _LINKS.c.step_id.in_(_ON_NEWCOMER))
    .join(_STEPS, _STEPS.c.id == _LINKS.c.step_id)
    .where(
        _LINKS.c.action_id == bindparam("b_old"),
        _LINKS.c.state == WAITING,
        _STEPS.c.action_id == bindparam("b_starter"),
    )
)
_COPY_LINK = insert(_LINKS).values(kind=LinkKind.ACTION.value, state=WAITING)


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
    """True when ``target`` waits on ``action_id`` through any chain of parent steps
    (or is ``action_id``: callers compare the two first).

    Every parent counts: the step that started it, those gained by sharing it (checksum)
    and those of the actions superseded into it (their links stay on them). One
    recursive query at any depth (:func:`_waiting_on`).
    """
    found = s.scalar(_WAITS_ON, {"b_action": action_id, "b_target": target})
    return found is not None


def _waiting_on() -> Any:
    """CTE of the actions that wait on ``action_id``, and of those superseded into them.

    From each action found, one recursive term follows both kinds of edge: up to the
    action of a step with a waiting link on it, and back to an action superseded into
    it (whose links stand for it). PostgreSQL allows the recursive reference once, so
    the term joins it to a two-row ``kind`` table and left-joins each kind's edge under
    its kind; both lookups use an index, on SQLite and PostgreSQL alike.
    """
    kinds = union_all(
        select(literal_column("1").label("kind")), select(literal_column("2").label("kind"))
    ).subquery("kinds")
    into = _ACTIONS.alias("into")
    up = (
        select(_ACTIONS.c.id.label("id"))
        .where(_ACTIONS.c.id == bindparam("b_action"))
        .cte("up", recursive=True)
    )
    found = func.coalesce(_STEPS.c.action_id, into.c.id)
    edge = (
        select(found)
        .select_from(up)
        .join(kinds, true())
        .outerjoin(
            _LINKS,
            and_(kinds.c.kind == 1, _LINKS.c.action_id == up.c.id, _LINKS.c.state == WAITING),
        )
        .outerjoin(_STEPS, _STEPS.c.id == _LINKS.c.step_id)
        .outerjoin(into, and_(kinds.c.kind == 2, into.c.superseded_by_id == up.c.id))
        .where(found.is_not(None))
    )
    return up.union(edge)


#: Whether ``:b_target`` waits on ``:b_action`` (prebuilt once: asked on every queued join).
_UP = _waiting_on()
_WAITS_ON = select(_UP.c.id).where(_UP.c.id == bindparam("b_target")).limit(1)
