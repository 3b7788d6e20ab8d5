"""Repair: rebuild lanes and in-flight steps from SQL after Redis lost its data.

SQL is the truth (DESIGN.md, "The three stores"). :func:`repair` first rebuilds every
lane from the open actions: the performing action is the lane's current one, the
newest pending action its pending one, and older pending actions are superseded as
the lane would have done (their parent steps move to the newest). It then re-sends
whatever in-flight work needs a message, because the broker may have lost its
messages with the same Redis:

- a step whose members all reported but that is still performing: ``stepped.advance``;
- a waiting parent link no action has claimed: ``stepped.start`` for that link;
- a waiting timed wait: ``stepped.wait`` with the time it has left;
- a performing action whose current step is not waiting on anything (its body never
  ran, or the step closed and the action did not move on): ``stepped.resume``;
- a pending action at the front of its lane: ``stepped.resume``;
- a performing action with a timeout: ``stepped.timeout`` with the time it has left;
- a final action that still has waiting parent links: ``stepped.resume`` (it reports).

Every message is idempotent, so re-sending one whose original survived only costs a
delivery. Without ``apply`` nothing changes and the report says what would be done.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .effects import Effects
from .errors import SteppedError
from .join import chain_ends
from .lane_repair import LaneRebuild, LaneRepair, plan_lane
from .lanes import Lanes
from .messages import Message, advance_message, resume_message, timeout_message, wait_message
from .models import Action, ParentLink, Step
from .outbox import Outboxes
from .performing import Performer
from .staging import discard
from .statuses import ActionStatus, LinkKind, LinkState
from .step_index import ran_every_step
from .superseding import LaneEntry

if TYPE_CHECKING:
    from .definition import SteppedAction

__all__ = ["LaneRepair", "Repair", "RepairReport", "Resend"]  # LaneRepair: lane_repair.py

PENDING, PERFORMING = ActionStatus.PENDING.value, ActionStatus.PERFORMING.value


@dataclass
class Resend:
    """A message repair sends: ``task`` for ``target`` (an action, step or link id)."""

    task: str
    target: int
    reason: str
    countdown: float | None = None

    def describe(self) -> str:
        """One line for the report."""
        delay = "" if self.countdown is None else f" in {self.countdown:.1f} s"
        return f"send {self.task}({self.target}){delay}: {self.reason}"


@dataclass
class RepairReport:
    """What :func:`repair` found and did (or, without ``apply``, would do)."""

    applied: bool
    lanes: list[LaneRepair] = field(default_factory=list)
    resends: list[Resend] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        """The report as text, one line per change (empty when nothing is to repair)."""
        return [
            *(lane.describe() for lane in self.lanes),
            *(resend.describe() for resend in self.resends),
            *(f"cannot repair: {problem}" for problem in self.problems),
        ]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "applied": self.applied,
            "lanes": [asdict(lane) for lane in self.lanes],
            "resends": [asdict(resend) for resend in self.resends],
            "problems": list(self.problems),
            "lines": self.lines,
        }


class Repair:
    """Repair of one Stepped instance (``stepped.repair()``, ``stepped repair``)."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        lanes: Lanes,
        entry: LaneEntry,
        performer: Performer,
        lookup: Callable[[str, str], SteppedAction[Any]],
        outboxes: Outboxes,
        clock: Callable[[], datetime],
    ) -> None:
        self.session_factory = session_factory
        self.lanes = lanes
        self.entry = entry
        self.performer = performer
        self.lookup = lookup
        self.outboxes = outboxes
        self.clock = clock

    def run(self, apply: bool = False) -> RepairReport:
        """Rebuild lanes and re-send what in-flight steps need, from SQL alone.

        Args:
            apply: make the changes; without it only report them.

        Returns:
            The report; its ``lines`` describe each change.
        """
        report = RepairReport(applied=apply)
        self._staged: list[int] = []
        messages = self._repair_lanes(report, apply)
        with self.session_factory() as s:
            messages += _unreported_steps(s, report)
            messages += self._unclaimed_links(s, report)
            messages += self._stalled_actions(s, report)
            messages += self._timeouts(s, report)
            messages += _unreported_actions(s, report)
        if apply:
            self.outboxes.send(messages)
            discard(self.session_factory, self._staged)
        return report

    # -- lanes --------------------------------------------------------------------------

    def _repair_lanes(self, report: RepairReport, apply: bool) -> list[Message]:
        """Each lane as SQL says; applied lane by lane under the lane's lock."""
        rebuild = LaneRebuild(self.session_factory, self.lanes, self.entry)
        by_key: dict[str, list[Any]] = defaultdict(list)
        for row in rebuild.open_rows():
            by_key[row.concurrency_key].append(row)
        messages: list[Message] = []
        effects = Effects()
        for key in sorted(set(by_key) | set(self.lanes.keys())):
            if not apply:
                planned = plan_lane(key, by_key.get(key, []), rebuild.found(key), report.problems)
            else:
                planned, done = rebuild.rebuild(key, report.problems)
                effects.add(done)
            if planned is not None:
                report.lanes.append(planned)
        messages += [advance_message(step_id) for step_id in effects.ready_steps]
        messages += self._resumes(effects.finished, "superseder already final")
        messages += self._resumes(effects.handoff, "promoted when its lane was released")
        self._staged += effects.staged
        return messages

    def _resumes(self, action_ids: list[int], reason: str) -> list[Message]:
        if not action_ids:
            return []
        with self.session_factory() as s:
            actions = s.scalars(select(Action).where(Action.id.in_(action_ids))).all()
            return [_resume(RepairReport(applied=True), a, reason) for a in actions]

    # -- in-flight steps and actions ----------------------------------------------------

    def _unclaimed_links(self, s: Session, report: RepairReport) -> list[Message]:
        """Waiting members that no action claimed, and timed waits still running."""
        links = s.scalars(
            select(ParentLink)
            .join(Step, Step.id == ParentLink.step_id)
            .where(
                ParentLink.state == LinkState.WAITING.value,
                ParentLink.action_id.is_(None),
                Step.completed_at.is_(None),
            )
            .order_by(ParentLink.id)
        ).all()
        messages: list[Message] = []
        for link in links:
            if link.kind == LinkKind.WAIT:
                messages.append(self._wait_left(link, report))
                continue
            try:
                messages += self.performer.members.messages([link])
            except SteppedError as exc:
                report.problems.append(f"link {link.id} of step {link.step_id}: {exc}")
                continue
            call = link.call or {}
            if link.kind == LinkKind.TASK:  # a plain task member: sent again, it counts once
                name = (call.get("signature") or {}).get("task")
                what = f"task {name} for step {link.step_id} never reported"
                report.resends.append(Resend(str(name), link.id, what))
                continue
            name = call.get("name")
            report.resends.append(
                Resend("stepped.start", link.id, f"{name} for step {link.step_id} never started")
            )
        return messages

    def _wait_left(self, link: ParentLink, report: RepairReport) -> Message:
        seconds = float((link.call or {}).get("seconds", 0))
        due = link.created_at + timedelta(seconds=seconds)
        left = max(0.0, (due - self.clock()).total_seconds())
        report.resends.append(
            Resend("stepped.wait", link.id, f"timed wait of step {link.step_id}", left)
        )
        return wait_message(link.id, left)

    def _stalled_actions(self, s: Session, report: RepairReport) -> list[Message]:
        """Performing actions whose current step waits on nothing, and pending lane fronts."""
        messages: list[Message] = []
        actions = s.scalars(
            select(Action).where(Action.status.in_((PENDING, PERFORMING))).order_by(Action.id)
        ).all()
        fronts = {lane.current_id for lane in report.lanes if lane.current_id is not None}
        for action in actions:
            if action.status == PENDING:
                lane = self.lanes.get(action.concurrency_key)
                at_front = action.id in fronts or (
                    lane is not None and lane.current_id == action.id
                )
                if at_front:
                    messages.append(_resume(report, action, "pending at the front of its lane"))
                continue
            reason = self._why_stalled(s, action, report)
            if reason is not None:
                messages.append(_resume(report, action, reason))
        return messages

    def _why_stalled(self, s: Session, action: Action, report: RepairReport) -> str | None:
        index = action.current_step_index
        try:
            count = len(self.lookup(action.actor_type, action.name).steps_for_run())
        except SteppedError as exc:
            report.problems.append(f"action {action.id} ({action.name}): {exc}")
            return None
        if ran_every_step(s, action.id, index, count):
            return None if action.outbound else "every step done, the action never completed"
        step = s.scalar(
            select(Step).where(Step.action_id == action.id, Step.definition_index == index)
        )
        if step is None:
            return f"step {index + 1} never ran"
        if step.completed_at is not None:
            return f"step {index + 1} {step.status}, the action never moved on"
        return None  # waiting on members, or reported above as unadvanced

    def _timeouts(self, s: Session, report: RepairReport) -> list[Message]:
        """Performing actions with a timeout whose lane had to be rebuilt (Redis, and the
        broker's scheduled messages with it, were lost): schedule the check again. A
        healthy action's timeout is still in the broker and is left alone."""
        lost = {lane.key for lane in report.lanes}
        rows = s.execute(
            select(
                Action.id,
                Action.name,
                Action.started_at,
                Action.timeout_seconds,
                Action.concurrency_key,
            )
            .where(Action.status == PERFORMING, Action.timeout_seconds.is_not(None))
            .order_by(Action.id)
        ).all()
        messages: list[Message] = []
        for row in (r for r in rows if r.concurrency_key in lost):
            started = row.started_at or self.clock()
            due = started + timedelta(seconds=float(row.timeout_seconds))
            left = max(0.0, (due - self.clock()).total_seconds())
            report.resends.append(
                Resend("stepped.timeout", row.id, f"{row.name}: its timeout", left)
            )
            messages.append(timeout_message(row.id, row.name, left))
        return messages


def _unreported_steps(s: Session, report: RepairReport) -> list[Message]:
    """Performing steps whose members all reported: the join's body never ran."""
    ids = s.scalars(
        select(Step.id)
        .join(Action, Action.id == Step.action_id)
        .where(
            Step.completed_at.is_(None),
            Step.pending_actions_count <= 0,
            Action.status == PERFORMING,
        )
        .order_by(Step.id)
    ).all()
    for step_id in ids:
        report.resends.append(
            Resend("stepped.advance", step_id, "every member reported, the step never advanced")
        )
    return [advance_message(step_id) for step_id in ids]


def _resume(report: RepairReport, action: Action, reason: str) -> Message:
    report.resends.append(Resend("stepped.resume", action.id, f"{action.name}: {reason}"))
    return resume_message(
        action.id, action.name, list(action.arguments), [action.actor_type, action.actor_id]
    )


def _unreported_actions(s: Session, report: RepairReport) -> list[Message]:
    """Final actions whose parents still wait on them: they never reported.

    The links a superseded action keeps wait on the end of its chain of superseders:
    they are unreported only once that end is final, and that end reports them.
    """
    waited_on = select(ParentLink.action_id).where(ParentLink.state == LinkState.WAITING.value)
    actions = s.scalars(
        select(Action)
        .where(Action.id.in_(chain_ends(waited_on)), Action.status.not_in((PENDING, PERFORMING)))
        .order_by(Action.id)
    ).all()
    return [_resume(report, a, f"{a.status} but a parent still waits on it") for a in actions]
