"""The read model of Stepped: actions, trees and lanes as JSON-ready dicts.

Everything here reads SQL (and Redis for lanes) and returns plain dicts and lists of
strings, numbers, booleans and ``None``, ready for ``json.dumps``; nothing prints.
The command line (:mod:`celery_stepped.cli`, drawn by :mod:`celery_stepped.rendering`)
and web pages (``celery_stepped.contrib.flask``) show the same data.

From the :class:`~celery_stepped.extension.Stepped` object these functions use only
``session_factory``, ``lanes``, ``clock`` and, to name steps, ``actors`` and
``registry``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .errors import ActionNotFound, SteppedError
from .members import task_member_view
from .models import Action, ParentLink, Step
from .statuses import ActionStatus

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement

    from .extension import Stepped

__all__ = [
    "MAX_PER_PAGE",
    "action_rows",
    "action_tree",
    "action_trees",
    "lane_rows",
    "root_rows",
]

MAX_PER_PAGE = 500
"""The largest ``per_page`` :func:`root_rows` accepts."""


def _step_number(action: Action, step_count: int | None) -> int | None:
    """The 1-based step an action is at (its last once it finished); None before it starts."""
    if action.started_at is None:
        return None
    number = action.current_step_index + 1
    return number if step_count is None else min(number, max(step_count, 1))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _seconds(start: datetime | None, end: datetime | None, now: datetime) -> float | None:
    if start is None:
        return None
    return round(((end or now) - start).total_seconds(), 3)


def _row(action: Action, step_count: int | None, now: datetime) -> dict[str, Any]:
    return {
        "id": action.id,
        "name": action.name,
        "actor": f"{action.actor_type}/{action.actor_id}",
        "status": action.status,
        "root": action.root,
        "current_step_index": action.current_step_index,
        "current_step_number": _step_number(action, step_count),
        "step_count": step_count,
        "created_at": _iso(action.created_at),
        "started_at": _iso(action.started_at),
        "completed_at": _iso(action.completed_at),
        "duration_seconds": _seconds(action.started_at, action.completed_at, now),
    }


# -- definitions ----------------------------------------------------------------------------


def _definition_facts(
    stepped: Stepped, actor_type: str, name: str
) -> tuple[list[str] | None, bool]:
    """Step names of a definition and whether it has a checksum (None: not defined here)."""
    try:
        cls = stepped.actors.resolve(actor_type).cls
        definition = stepped.registry.find(cls, name)
    except (SteppedError, LookupError, TypeError):
        return None, False
    names = [getattr(b, "__name__", "step").lstrip("_") for b in definition.steps_for_run()]
    return names, definition.resolved("checksum_fn") is not None


class _StepCounts:
    """Number of steps per ``(actor_type, name)``, looked up once each."""

    def __init__(self, stepped: Stepped) -> None:
        self.stepped = stepped
        self.counts: dict[tuple[str, str], int | None] = {}

    def __call__(self, action: Action) -> int | None:
        key = (action.actor_type, action.name)
        if key not in self.counts:
            names = _definition_facts(self.stepped, *key)[0]
            self.counts[key] = None if names is None else len(names)
        return self.counts[key]


# -- trees --------------------------------------------------------------------------------


@dataclass
class _Loaded:
    actions: dict[int, Action] = field(default_factory=dict)
    links: dict[int, list[ParentLink]] = field(default_factory=dict)


def _load(session: Session, root_ids: Iterable[int]) -> _Loaded:
    """Every action, step and parent link reachable from the roots, level by level."""
    loaded = _Loaded()
    frontier = set(root_ids)
    while frontier:
        ids = sorted(frontier)
        for action in session.scalars(select(Action).where(Action.id.in_(ids))):
            loaded.actions[action.id] = action
        step_ids = [s.id for i in ids if i in loaded.actions for s in loaded.actions[i].steps]
        links = session.scalars(
            select(ParentLink).where(ParentLink.step_id.in_(step_ids)).order_by(ParentLink.id)
        ).all()
        for link in links:
            loaded.links.setdefault(link.step_id, []).append(link)
        frontier = {
            link.action_id
            for link in links
            if link.action_id is not None and link.action_id not in loaded.actions
        }
    return loaded


class _TreeBuilder:
    """Turns loaded rows into the JSON-ready nodes of :func:`action_trees`."""

    def __init__(self, stepped: Stepped, loaded: _Loaded, now: datetime) -> None:
        self.stepped = stepped
        self.loaded = loaded
        self.now = now

    def definition_facts(self, actor_type: str, name: str) -> tuple[list[str] | None, bool]:
        return _definition_facts(self.stepped, actor_type, name)

    def node(self, action_id: int, path: frozenset[int] = frozenset()) -> dict[str, Any]:
        action = self.loaded.actions[action_id]
        step_names, _ = self.definition_facts(action.actor_type, action.name)
        step_count = None if step_names is None else len(step_names)
        path = path | {action_id}
        return {
            **_row(action, step_count, self.now),
            "arguments": action.arguments,
            "outbound": action.outbound,
            "job": action.job,
            "concurrency_key": action.concurrency_key,
            "checksum_key": action.checksum_key,
            "checksum": action.checksum,
            "timeout_seconds": action.timeout_seconds,
            "after_callbacks_succeeded_count": action.after_callbacks_succeeded_count,
            "after_callbacks_failed_count": action.after_callbacks_failed_count,
            "error": action.error,
            "superseded_by": action.superseded_by_id,
            "steps": [self.step(s, step_names, path) for s in action.steps],
        }

    def step(self, step: Step, names: Sequence[str] | None, path: frozenset[int]) -> dict[str, Any]:
        index = step.definition_index
        return {
            "index": index,
            "number": index + 1,
            "name": names[index] if names is not None and index < len(names) else None,
            "status": step.status,
            "started_at": _iso(step.started_at),
            "completed_at": _iso(step.completed_at),
            "duration_seconds": _seconds(step.started_at, step.completed_at, self.now),
            "pending_members": step.pending_actions_count,
            "unsuccessful_members": step.unsuccessful_actions_count,
            "error": step.error,
            "members": [self.member(link, path) for link in self.loaded.links.get(step.id, [])],
        }

    def member(self, link: ParentLink, path: frozenset[int]) -> dict[str, Any]:
        call = dict(link.call or {})
        base = {"kind": link.kind, "state": link.state, "outcome": link.outcome}
        if link.kind == "wait":
            return {**base, "seconds": call.get("seconds")}
        if link.kind == "task":
            return {**base, **task_member_view(call, link.state, link.created_at, link.updated_at)}
        actor = call.get("actor") or ["?", "?"]
        member = {**base, "name": call.get("name"), "actor": f"{actor[0]}/{actor[1]}"}
        if link.action_id is None:
            _, has_checksum = self.definition_facts(str(actor[0]), str(call.get("name")))
            member["skipped"] = link.state == "done"
            member["reason"] = _skip_reason(link.outcome, has_checksum) if link.outcome else None
            return {**member, "action": None}
        if link.action_id in path or link.action_id not in self.loaded.actions:
            return {**member, "action": {"id": link.action_id, "cycle": True}}
        return {**member, "action": self.node(link.action_id, path)}


def _skip_reason(outcome: str, has_checksum: bool) -> str:
    if outcome == ActionStatus.SUCCEEDED.value:
        return "already achieved" if has_checksum else "completed in before"
    return f"{outcome} in before"


def action_trees(stepped: Stepped, action_ids: Sequence[int]) -> list[dict[str, Any]]:
    """JSON-ready trees of the given actions (unknown ids are left out).

    Each node holds the fields of an :func:`action_rows` row (``current_step_number``
    1-based, None before the start; ``duration_seconds`` completed or now, minus
    started), the action's other columns, ``error`` (``{"type", "message",
    "traceback"}`` when the action failed outside a step, else None), ``superseded_by``
    (the superseder's id or None) and ``steps``.

    Each step holds ``index`` (0-based, in the definition), ``number`` (``index + 1``,
    as in ``step 2/3``), ``name``, ``status``, timings, ``error`` (the exception its
    body raised, same shape, or None) and its ``members`` in the order the step started
    them: ``{"kind": "wait", "seconds", "state"}``, ``{"kind": "task", "name", "args",
    "kwargs", "timeout", "state", "outcome", timings}`` (a plain Celery task, ``step.task``)
    or ``{"kind": "action", "name",
    "actor", "state", "outcome", "action": <node> | None}``. A member whose action never
    persisted (a checksum already achieved, a ``before`` that completed or cancelled it)
    has ``"action": None`` and ``"skipped": True``.
    """
    now = stepped.clock()
    with stepped.session_factory() as session:
        loaded = _load(session, action_ids)
        builder = _TreeBuilder(stepped, loaded, now)
        return [builder.node(i) for i in action_ids if i in loaded.actions]


def action_tree(stepped: Stepped, action_id: int) -> dict[str, Any]:
    """The tree of one action (see :func:`action_trees`).

    Raises:
        ActionNotFound: no action has this id.
    """
    trees = action_trees(stepped, [action_id])
    if not trees:
        raise ActionNotFound(f"no action #{action_id}")
    return trees[0]


# -- lanes --------------------------------------------------------------------------------


def _brief(action: Action | None, now: datetime) -> dict[str, Any] | None:
    if action is None:
        return None
    since = action.started_at if action.status == "performing" else action.created_at
    return {
        "id": action.id,
        "name": action.name,
        "actor": f"{action.actor_type}/{action.actor_id}",
        "status": action.status,
        "age_seconds": _seconds(since, None, now),
    }


def lane_rows(stepped: Stepped) -> list[dict[str, Any]]:
    """Every lane: ``key``, ``current`` and ``pending`` actions with their ages.

    The age of the current action counts from its start, that of a pending one from its
    creation. An id Redis knows but SQL does not shows as ``{"id": .., "missing": True}``.
    """
    lanes = stepped.lanes.all()
    ids = {i for lane in lanes for i in [lane.current_id, *lane.pending_ids] if i is not None}
    now = stepped.clock()
    with stepped.session_factory() as session:
        actions = {a.id: a for a in session.scalars(select(Action).where(Action.id.in_(ids)))}

    def brief(i: int) -> dict[str, Any]:
        return _brief(actions.get(i), now) or {"id": i, "missing": True}

    return [
        {
            "key": lane.key,
            "current": None if lane.current_id is None else brief(lane.current_id),
            "pending": [brief(i) for i in lane.pending_ids],
        }
        for lane in lanes
    ]


# -- lists of actions ------------------------------------------------------------------------


def action_rows(
    stepped: Stepped,
    *,
    statuses: Sequence[str] = (),
    name: str | None = None,
    limit: int = 50,
    roots_only: bool = False,
) -> list[dict[str, Any]]:
    """Actions newest first, filtered by status(es), name and rootness.

    Each row holds ``id``, ``name``, ``actor`` (``type/id``), ``status``, ``root``,
    ``current_step_index`` (0-based), ``current_step_number`` (1-based, None before the
    start), ``step_count``, the ISO timestamps and ``duration_seconds``.
    """
    query = select(Action).order_by(Action.id.desc()).limit(limit)
    if statuses:
        query = query.where(Action.status.in_(list(statuses)))
    if name:
        query = query.where(Action.name == name)
    if roots_only:
        query = query.where(Action.root.is_(True))
    now, step_count = stepped.clock(), _StepCounts(stepped)
    with stepped.session_factory() as session:
        return [_row(a, step_count(a), now) for a in session.scalars(query)]


def _check_page(status: str | None, actor: str | None, page: int, per_page: int) -> None:
    if status is not None and status not in {s.value for s in ActionStatus}:
        known = ", ".join(s.value for s in ActionStatus)
        raise ValueError(f"unknown status {status!r}: expected one of {known}")
    if page < 1:
        raise ValueError(f"page must be 1 or more, not {page}")
    if actor is not None and (not actor.partition("/")[0] or actor.endswith("/")):
        raise ValueError(f"actor must be 'Type' or 'Type/id', not {actor!r}")
    if not 1 <= per_page <= MAX_PER_PAGE:
        raise ValueError(f"per_page must be between 1 and {MAX_PER_PAGE}, not {per_page}")


def _root_conditions(name: str | None, actor: str | None) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [Action.root.is_(True)]
    if name:
        conditions.append(Action.name == name)
    if actor:
        actor_type, slash, actor_id = actor.partition("/")
        conditions.append(Action.actor_type == actor_type)
        if slash:
            conditions.append(Action.actor_id == actor_id)
    return conditions


def _status_counts(session: Session, conditions: list[ColumnElement[bool]]) -> dict[str, int]:
    query = select(Action.status, func.count()).where(*conditions).group_by(Action.status)
    found = {str(status): int(count) for status, count in session.execute(query).tuples()}
    return {s.value: found.get(s.value, 0) for s in ActionStatus}


def root_rows(
    stepped: Stepped,
    *,
    status: str | None = None,
    name: str | None = None,
    actor: str | None = None,
    page: int = 1,
    per_page: int = 50,
) -> dict[str, Any]:
    """One page of root actions, newest first, for an index page.

    Args:
        stepped: the Stepped instance.
        status: only actions in this status.
        name: only actions of this name.
        actor: only actions on this actor: ``"Car"`` (a type) or ``"Car/7"`` (one actor).
        page: the page, from 1; a page past the last one has no items.
        per_page: rows per page, 1 to :data:`MAX_PER_PAGE`.

    Returns:
        ``{"items": [row, ...], "total", "page", "per_page", "pages", "counts"}``: rows
        as in :func:`action_rows`; ``total`` counts the matching root actions, ``pages``
        is at least 1; ``counts`` maps every status to the number of root actions in it
        that match ``name`` and ``actor`` (whatever ``status`` is), for status tabs.

    Raises:
        ValueError: an unknown status, a malformed actor, a page or per_page out of range.
    """
    _check_page(status, actor, page, per_page)
    conditions = _root_conditions(name, actor)
    matching = [*conditions, Action.status == status] if status is not None else conditions
    now, step_count = stepped.clock(), _StepCounts(stepped)
    with stepped.session_factory() as session:
        total = session.scalar(select(func.count(Action.id)).where(*matching)) or 0
        query = select(Action).where(*matching).order_by(Action.id.desc())
        query = query.offset((page - 1) * per_page).limit(per_page)
        items = [_row(a, step_count(a), now) for a in session.scalars(query)]
        counts = _status_counts(session, conditions)
    pages = max(1, math.ceil(total / per_page))
    return dict(items=items, total=total, page=page, per_page=per_page, pages=pages, counts=counts)
