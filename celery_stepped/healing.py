"""Healing: what the workers' sweep resumes when nothing else would move it on.

Every transition commits before it acts, and a crash after the commit is finished by
the redelivery of the message that ran it. Two kinds of work fall outside that:

- a pending action whose begin message the broker lost (Redis restarted empty after
  the lane promoted it), or whose lane Redis lost: it sits at its lane's front, in no
  lane, or behind a current action that is already final, and nothing will promote it;
- work a task did *inline* for another action: a lane handoff runs the promoted action
  in the task that released the lane, and a step's last member runs its parent's next
  steps and completion, and that parent's parent's, in the same task. A worker killed
  part-way leaves committed rows no redelivery follows up: a performing action whose
  current step closed (or never committed), a step whose members all reported but
  that never advanced, a final action whose parents still wait on it;
- a member message lost after it was sent: a worker killed between taking it from the
  broker and recording it as unacknowledged (Kombu's Redis transport pops a message
  first and records it next), or a broker that lost it. A child action's start then
  never arrives and a timed wait never fires. The child's link is still unclaimed and
  the wait's link overdue, so both are sent again, but only while the queue they go to
  holds nothing (behind a backlog a member is late, not lost). A task member is not:
  it would run the user's task a second time, and a slow task looks like a lost one.

``stepped repair`` finds all of it, but only when an operator runs it. The sweep every
worker runs (at start and every ``stepped_outbox_sweep_every`` seconds) also runs
:meth:`Healing.heal`, over rows older than the sweep's age (``stepped_outbox_sweep_after``).
What it finds on two sweeps in a row is healed: a stalled pending action's lane is
rebuilt from SQL under the lane's lock, as repair does, and its current action resumed;
a stalled performing action is resumed, a stalled step advanced, an unreported action's
report made again. Each of these is idempotent, so a suspect that was only slow costs a
redundant message. One limit: a step body that runs for longer than two sweeps (90 s
by default) looks like a stalled action; on PostgreSQL its resume waits for the body's
row lock and finds the step written, on SQLite the body could run a second time (its
database writes would not commit twice).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import select
from sqlalchemy.orm import Session

from .backlog import Backlog
from .effects import Effects
from .errors import SteppedError
from .events import logger
from .join import chain_ends, status_of
from .lane_repair import LaneRebuild
from .lanes import Lanes
from .members import link_messages
from .messages import Message, wait_message
from .models import Action, ParentLink, Step
from .statuses import ActionStatus, LinkKind, LinkState, StepStatus

if TYPE_CHECKING:
    from .definition import SteppedAction

__all__ = ["Healing"]

PENDING, PERFORMING = ActionStatus.PENDING.value, ActionStatus.PERFORMING.value
#: Rows of each kind looked at per sweep (the oldest first).
BATCH = 500
#: A suspect: ``(kind, id)``; kinds ``lane`` (a pending action), ``resume`` (a performing
#: action), ``advance`` (a step), ``report`` (a final action), ``members`` (a step whose
#: member messages never arrived).
Suspect = tuple[str, int]


class Healing:
    """Finds and heals stalled work (see the module's docstring).

    One instance per Stepped instance; it remembers the suspects of the previous sweep
    of this process, so a suspect is healed only when a second sweep still finds it.
    """

    def __init__(
        self,
        session_factory: Callable[[], Session],
        lanes: Lanes,
        rebuild: LaneRebuild,
        lookup: Callable[[str, str], SteppedAction[Any]],
        clock: Callable[[], datetime],
        waiting: Callable[[str | None], int | None] = lambda _queue: 0,
    ) -> None:
        self.session_factory = session_factory
        self.lanes = lanes
        self.rebuild = rebuild
        self.lookup = lookup
        self.clock = clock
        self.waiting = waiting
        self._seen: set[Suspect] = set()

    def heal(self, older_than: float) -> Effects:
        """Heal what two sweeps in a row found stalled (rows older than ``older_than``
        seconds); what is left to do: the actions to resume (``handoff``), the steps to
        advance, the reports to make again, and what rebuilding lanes decided."""
        cutoff = self.clock() - timedelta(seconds=older_than)
        lanes = self.pending_suspects(cutoff)
        work = self.work_suspects(cutoff)
        seen_before = self._seen
        self._seen = work | {("lane", i) for ids in lanes.values() for i in ids}
        effects = Effects()
        for key, ids in sorted(lanes.items()):
            again = sorted(i for i in ids if ("lane", i) in seen_before)
            if again:
                effects.add(self.heal_lane(key, again))
        due = sorted(work & seen_before)
        members = [target for kind, target in due if kind == "members"]
        effects.add(_heal_work([suspect for suspect in due if suspect[0] != "members"]))
        return effects.add(Effects(self.resend_members(members, cutoff)))

    # -- pending actions: their lanes -----------------------------------------------------

    def pending_suspects(self, cutoff: datetime) -> dict[str, set[int]]:
        """Pending actions created before ``cutoff`` that their lane would never move
        on, by concurrency key."""
        with self.session_factory() as s:
            rows = s.execute(
                select(Action.id, Action.concurrency_key, Action.root)
                .add_columns(Action.actor_type, Action.name)
                .where(Action.status == PENDING, Action.created_at <= cutoff)
                .order_by(Action.id)
                .limit(BATCH)
            ).all()
        by_key: dict[str, set[int]] = defaultdict(set)
        backlog, late = Backlog(self.waiting), set()
        for row in rows:
            by_key[row.concurrency_key].add(row.id)
            if not row.root and not backlog.idle(self._queue_of(row.actor_type, row.name)):
                late.add(row.id)  # a child whose start may still wait in its queue
        found = {key: self._stalled(key, ids, late) for key, ids in by_key.items()}
        return {key: ids for key, ids in found.items() if ids}

    def _stalled(self, key: str, ids: set[int], late: set[int]) -> set[int]:
        """Those of ``ids`` (pending in SQL) that lane ``key`` would never move on: at
        its front, in no lane, or behind a current action that is no longer open; not
        those of ``late`` (children behind a backlog) that are in no lane yet."""
        lane = self.lanes.get(key)
        entered = set() if lane is None else {lane.current_id, *lane.pending_ids}
        ids = {i for i in ids if i in entered or i not in late}
        if lane is None:
            return ids
        waiting = ids & set(lane.pending_ids)
        if waiting and not self._open(lane.current_id):
            return ids
        return ids - waiting

    def _open(self, action_id: int | None) -> bool:
        status = self._status(action_id)
        return status is not None and not ActionStatus(status).is_final

    def _status(self, action_id: int | None) -> str | None:
        if action_id is None:
            return None
        with self.session_factory() as s:
            return status_of(s, action_id)

    def heal_lane(self, key: str, ids: list[int]) -> Effects:
        """Rebuild lane ``key`` from SQL (under its lock) and resume its current action
        when it is still pending."""
        problems: list[str] = []
        planned, effects = self.rebuild.rebuild(key, problems)
        for problem in problems:
            logger.warning("stepped heal: %s", problem)
        current, _ = self.lanes.current_checksum(key)
        resume = current is not None and current not in effects.handoff
        if resume and self._status(current) == PENDING:
            effects.handoff.append(cast(int, current))
        if planned is None and not effects.handoff:
            return effects  # it moved on meanwhile
        change = planned.describe() if planned is not None else f"lane {key!r} agreed with SQL"
        logger.warning(
            "stepped heal: pending action(s) %s had nothing to move them on: %s; resuming %s",
            ", ".join(map(str, ids)),
            change,
            ", ".join(map(str, effects.handoff)) or "nothing",
        )
        return effects

    # -- work a killed task left half done ------------------------------------------------

    def work_suspects(self, cutoff: datetime) -> set[Suspect]:
        """Committed before ``cutoff`` and not followed up: performing actions whose
        current step closed or was never written (begun, then killed before its first
        step committed), steps whose members all reported, final actions whose parents
        still wait on them."""
        with self.session_factory() as s:
            closed = s.execute(_closed_current_steps(cutoff)).all()
            steps = s.scalars(_unadvanced_steps(cutoff)).all()
            actions = s.scalars(_unreported_actions(cutoff)).all()
            members = s.execute(_open_members(cutoff)).all()
            unstepped = s.scalars(_stepless_performing(cutoff)).all()
        resume = {("resume", row.id) for row in closed if not self._waits_outside(row)}
        resume |= {("resume", i) for i in unstepped}
        unsent = {("members", row.step_id) for row in members if _unsent(row, cutoff)}
        return resume | unsent | {("advance", i) for i in steps} | {("report", i) for i in actions}

    def resend_members(self, step_ids: list[int], cutoff: datetime) -> list[Message]:
        """The member messages of ``step_ids`` that never arrived, sent again: child
        starts nothing claimed, and timed waits overdue (each with the time it has left)."""
        if not step_ids:
            return []
        with self.session_factory() as s:
            rows = s.execute(_open_members(cutoff).where(ParentLink.step_id.in_(step_ids))).all()
        messages: list[Message] = []
        now = self.clock()
        for row in rows:
            if not _unsent(row, cutoff):
                continue
            queue = self._queue_of(row.actor_type, row.name)
            if row.kind == LinkKind.WAIT.value:
                due = row.created_at + timedelta(seconds=_seconds(row.call))
                left = max(0.0, (due - now).total_seconds())
                messages.append(wait_message(row.id, left, queue))
            else:
                messages.extend(link_messages([_link(row)], queue, self._queue_of))
        messages = Backlog(self.waiting).not_queued(messages)
        if messages:
            logger.warning(
                "stepped heal: %d member message(s) of step(s) %s never arrived: sent again",
                len(messages),
                ", ".join(map(str, step_ids)),
            )
        return messages

    def _queue_of(self, actor_type: str, name: str) -> str | None:
        try:
            queue: str | None = self.lookup(actor_type, name).resolved("action_queue")
        except SteppedError:
            return None
        return queue

    def _waits_outside(self, row: Any) -> bool:
        """An outbound action whose steps all succeeded waits for its outside event (or
        an action whose definition is gone, left to repair's report)."""
        if not row.outbound or row.status != StepStatus.SUCCEEDED.value:
            return False
        try:
            count = len(self.lookup(row.actor_type, row.name).steps_for_run())
        except SteppedError:
            return True
        return bool(row.current_step_index >= count - 1)


def _seconds(call: Any) -> float:
    return float((call or {}).get("seconds", 0))


def _unsent(row: Any, cutoff: datetime) -> bool:
    """A child link nothing claimed, or a wait due before ``cutoff``."""
    if row.kind == LinkKind.ACTION.value:
        return True
    return bool(row.created_at + timedelta(seconds=_seconds(row.call)) <= cutoff)


def _link(row: Any) -> ParentLink:
    """A detached link with what :func:`~celery_stepped.members.link_messages` reads."""
    return ParentLink(id=row.id, step_id=row.step_id, kind=row.kind, call=row.call)


def _open_members(cutoff: datetime) -> Any:
    """Waiting child links nothing claimed and waiting timed waits, created before
    ``cutoff``, of open steps of performing actions (with the action's type and name)."""
    unclaimed = (ParentLink.kind == LinkKind.ACTION.value) & ParentLink.action_id.is_(None)
    return (
        _waiting_links(
            ParentLink.id,
            ParentLink.step_id,
            ParentLink.kind,
            ParentLink.call,
            ParentLink.created_at,
            Action.actor_type,
            Action.name,
        )
        .where(
            ParentLink.created_at <= cutoff,
            unclaimed | (ParentLink.kind == LinkKind.WAIT.value),
        )
        .order_by(ParentLink.id)
        .limit(BATCH)
    )


def _waiting_links(*columns: Any) -> Any:
    """``columns`` of the waiting links of open steps of performing actions."""
    return (
        select(*columns)
        .join(Step, Step.id == ParentLink.step_id)
        .join(Action, Action.id == Step.action_id)
        .where(
            Action.status == PERFORMING,
            Step.completed_at.is_(None),
            ParentLink.state == LinkState.WAITING.value,
        )
    )


def _heal_work(suspects: list[Suspect]) -> Effects:
    """What healing the work suspects takes: resumes, advances, reports."""
    effects = Effects()
    for kind, target in suspects:
        if kind == "resume":
            effects.handoff.append(target)
        elif kind == "advance":
            effects.ready(target)
        else:
            effects.finished.append(target)
    if suspects:
        said = ", ".join(f"{kind} {target}" for kind, target in suspects)
        logger.warning("stepped heal: work a killed task left half done: %s", said)
    return effects


def _stepless_performing(cutoff: datetime) -> Any:
    """Actions performing since before ``cutoff`` with no row for their current step:
    begun (often inline, by a lane handoff) and killed before that step committed."""
    current_step = (Step.action_id == Action.id) & (
        Step.definition_index == Action.current_step_index
    )
    return (
        select(Action.id)
        .where(
            Action.status == PERFORMING,
            Action.started_at <= cutoff,
            ~select(Step.id).where(current_step).exists(),
        )
        .order_by(Action.id)
        .limit(BATCH)
    )


def _closed_current_steps(cutoff: datetime) -> Any:
    """Performing actions whose current step closed before ``cutoff``."""
    return (
        select(
            Action.id,
            Action.actor_type,
            Action.name,
            Action.outbound,
            Action.current_step_index,
            Step.status,
        )
        .join(
            Step,
            (Step.action_id == Action.id) & (Step.definition_index == Action.current_step_index),
        )
        .where(Action.status == PERFORMING, Step.completed_at <= cutoff)
        .order_by(Action.id)
        .limit(BATCH)
    )


def _unadvanced_steps(cutoff: datetime) -> Any:
    """Open steps (started before ``cutoff``) of performing actions whose members all
    reported."""
    return (
        select(Step.id)
        .join(Action, Action.id == Step.action_id)
        .where(
            Step.completed_at.is_(None),
            Step.pending_actions_count <= 0,
            Step.started_at <= cutoff,
            Action.status == PERFORMING,
        )
        .order_by(Step.id)
        .limit(BATCH)
    )


def _unreported_actions(cutoff: datetime) -> Any:
    """Actions final before ``cutoff`` that an open step of a performing action still
    waits on, directly or through actions superseded into them (the end of a chain of
    superseders reports for the whole chain). Found from the performing actions down,
    so the query stays as small as the work in flight."""
    waited_on = _waiting_links(ParentLink.action_id).where(ParentLink.action_id.is_not(None))
    return (
        select(Action.id)
        .where(
            Action.id.in_(chain_ends(waited_on)),
            Action.status.not_in((PENDING, PERFORMING)),
            Action.completed_at <= cutoff,
        )
        .order_by(Action.id)
        .limit(BATCH)
    )
