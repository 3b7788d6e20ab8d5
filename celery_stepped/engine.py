"""The engine: entry points of the internal tasks, and the one loop that drives a tree.

Transitions (starting, superseding, performing, completing, the join) change rows
and return :class:`~celery_stepped.effects.Effects`. :meth:`Engine.drive` is the only
place that acts on them: it sends messages through the outbox and runs what is ready
(a step whose members all reported, an action its lane let in, a completion) from
one queue, breadth-first, so a tree of any depth moves on in constant stack depth.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .backlog import Backlog
from .beginning import Fresh
from .completing import Completer
from .effects import Delivery, Effects
from .events import Events, error_record, logger
from .join import counted_steps_of_performing, detached_action, report_link, status_of
from .members import task_outcome
from .messages import (
    CompleteCall,
    Message,
    MessageKind,
    StartCall,
    TaskName,
    advance_message,
    timeout_message,
)
from .models import Action, ParentLink
from .outbound import outbound_to_complete
from .outbox import Outboxes, run_task_locally
from .performing import Performer
from .routing import Routes, resume_messages
from .staging import as_redelivery, discard, discard_keyed, due, named_by
from .starting import FINISHED_WITHOUT_ROW, Created, ShortCircuit, Starter, placeholder
from .statuses import ActionStatus, LinkKind
from .superseding import LaneEntry

if TYPE_CHECKING:
    from .definition import SteppedAction

__all__ = ["Engine"]

PENDING, PERFORMING = ActionStatus.PENDING.value, ActionStatus.PERFORMING.value
Handler = Callable[..., Any]

_in_worker: contextvars.ContextVar[bool] = contextvars.ContextVar("stepped_worker", default=False)
_recovering: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "stepped_recovering", default=False
)


class Engine:
    """Runs the internal messages of one Stepped instance."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        starter: Starter,
        entry: LaneEntry,
        performer: Performer,
        completer: Completer,
        outboxes: Outboxes,
        lookup: Callable[[str, str], SteppedAction[Any]],
        events: Events,
        clock: Callable[[], datetime],
        routes: Routes | None = None,
    ) -> None:
        self.routes = routes
        self.session_factory = session_factory
        self.starter = starter
        self.entry = entry
        self.performer = performer
        self.completer = completer
        self.outboxes = outboxes
        self.lookup = lookup
        self.events = events
        self.clock = clock

    # -- context -----------------------------------------------------------------------

    @staticmethod
    @contextmanager
    def delivering(recovering: bool = False) -> Iterator[None]:
        """Mark the code inside as running a message (joins advance in this process)."""
        worker, again = _in_worker.set(True), _recovering.set(recovering)
        try:
            yield
        finally:
            _recovering.reset(again)
            _in_worker.reset(worker)

    def delivery(self) -> Delivery:
        """How the current message runs."""
        return Delivery(
            recovering=_recovering.get(), local=self.outboxes.local, in_worker=_in_worker.get()
        )

    def _inline(self) -> bool:
        return _in_worker.get() or self.outboxes.local

    # -- the loop ----------------------------------------------------------------------

    def drive(self, effects: Effects) -> None:
        """Act on ``effects`` and on everything they lead to, from one queue."""
        work: deque[Effects] = deque([effects])
        while work:
            done = work.popleft()
            self.outboxes.send(done.messages)
            # Sent, and its follow-ups start now in this task: from here on a crash is
            # finished by the redelivery of this task's message, not by a sweep (which
            # could otherwise run a long step body a second time meanwhile).
            discard(self.session_factory, done.staged)
            work.extend(self._follow_up(done))

    def sweep(self, older_than: float, backlog: Backlog) -> int:
        """Send again what a crash left in the outbox (entries older than ``older_than``
        seconds), and kept ``later()`` starts whose queue is idle (``backlog``); they run
        as redeliveries. Returns how many were sent."""
        now = self.clock()
        entries = backlog.sweepable(due(self.session_factory, now, older_than))
        self.outboxes.send([as_redelivery(e.message, e.created_at, now) for e in entries])
        discard(self.session_factory, [e.id for e in entries])
        return len(entries)

    def _follow_up(self, effects: Effects) -> Iterator[Effects]:
        inline, delivery = self._inline(), self.delivery()
        for key, action_id in effects.released:  # completed with its last step
            yield self.completer.release(key, action_id)
        for step_id in dict.fromkeys(effects.ready_steps):
            yield self._advance_or_route(step_id, inline)
        if effects.handoff and _in_worker.get():
            # Lane handoff inline, as Stepped's Performance#forward: same task, no message.
            yield from (self._carry_on_or_route(action_id) for action_id in effects.handoff)
        elif effects.handoff:
            yield Effects(self._resume_messages(effects.handoff))
        for action_id in effects.finished:
            yield self.completer.finish(action_id, delivery)
        for action_id, status in effects.complete:
            yield self.completer.complete(action_id, status, delivery)[1]
        for action_id in effects.perform:
            yield self.perform(action_id)

    def _advance_or_route(self, step_id: int, inline: bool) -> Effects:
        """Advance the step here, or send it to its action's queue (``routing``)."""
        if self.routes is None:
            return self.advance_step(step_id) if inline else Effects([advance_message(step_id)])
        if inline:  # the step's position names its action: no query for its queue
            return self.performer.advance(step_id, self.delivery(), self.routes.elsewhere_for)
        return Effects([advance_message(step_id, self.routes.of_step(step_id))])

    def _carry_on_or_route(self, action_id: int) -> Effects:
        """A promoted action carries on here, or on its own queue (``routing``)."""
        if self.routes is None or self.routes.elsewhere(action_id=action_id) is None:
            return self.carry_on(action_id)
        return Effects(self._resume_messages([action_id]))

    def _resume_messages(self, action_ids: list[int]) -> list[Message]:
        return resume_messages(self.session_factory, action_ids, self.routes)

    # -- transitions driven from here ----------------------------------------------------

    def perform(self, action_id: int, fresh: Fresh | None = None) -> Effects:
        """The lane let this action perform: begin it and run its steps (``fresh``: its row
        as this call wrote or read it, see :meth:`Performer.begin_and_run`)."""
        delivery = self.delivery()
        ran = None if fresh is None else self.performer.begin_and_run(fresh, delivery)
        if ran is not None:
            return ran
        began = self.performer.begin(action_id, delivery)
        if began is not None and began.complete:  # achieved while it waited: skipped
            return began
        if began is not None and began.began is not None:
            return began.add(self.performer.run_first_steps(action_id, began.began, delivery))
        if began is not None:
            return began.add(self.performer.run_steps(action_id, delivery))
        if self._status(action_id) == ActionStatus.SUPERSEDED.value:
            # Superseded at the lane front before it could begin: release the lane.
            return self.completer.finish(action_id, delivery)
        return Effects()

    def advance_step(self, step_id: int) -> Effects:
        """A step's members all reported: close it and run what follows."""
        return self.performer.advance(step_id, self.delivery())

    def _read(self, action_id: int) -> Action | None:
        """The action's row, detached; None when there is none."""
        with self.session_factory() as s:
            return detached_action(s, action_id)

    def _status(self, action_id: int) -> str | None:
        with self.session_factory() as s:
            return status_of(s, action_id)

    def _follow_link(self, link_id: int) -> Effects:
        """In a redelivery: the step of an already counted link, if its action performs."""
        if not _recovering.get():
            return Effects()
        with self.session_factory() as s:
            step_id = s.scalar(counted_steps_of_performing(ParentLink.id == link_id))
        return Effects().ready(step_id)

    def give_up(self, task: str, args: tuple[Any, ...], exc: BaseException) -> None:
        """A message whose store errors outlasted its retries: fail the action it names,
        with the reason in its row, so its parents and lane move on (best effort: the
        store may still be down, and then this raises too)."""
        error = error_record(exc)
        error["message"] = f"gave up after repeated store errors in {task}: {exc}"
        action_id, link_id = named_by(self.session_factory, task, args)
        if link_id is not None:  # a child never created: its parent step counts a failure
            self.drive(report_link(self.session_factory, link_id, "failed", False, self.clock()))
        if action_id is not None:
            self.completer.record_error(action_id, error)
            self.complete(action_id, ActionStatus.FAILED.value)

    # -- entry points of the internal tasks ----------------------------------------------

    def run_message(self, message: Message) -> bool:
        """Run one message in this process (eager mode, captures); False when it changed
        nothing (a timeout not due yet). A message sent again (``retries``) runs as a
        redelivery, as it would in a worker."""
        with self.delivering(message.retries > 0):
            if message.kind is MessageKind.TASK:
                link_id, payload = message.args
                self.finish_member(
                    link_id, task_outcome(self.outboxes.app, payload, message.task_id)
                )
                return True
            if message.kind is MessageKind.JOB:
                again = run_task_locally(self.outboxes.app, message)
                if again is not None:
                    self.outboxes.send([again])
                return True
            return self.handlers()[message.task](*message.args) is not False

    def handlers(self) -> dict[str, Handler]:
        """The handler of each internal task, by task name (``tasks`` registers them)."""
        return {
            TaskName.START: self.start,
            TaskName.RESUME: self.resume,
            TaskName.ADVANCE: self.advance,
            TaskName.WAIT: self.finish_wait,
            TaskName.TIMEOUT: self.fire_timeout,
            TaskName.COMPLETE: self.complete_message,
            TaskName.MEMBER: self.finish_member,
        }

    def start(self, payload: dict[str, Any]) -> int | None:
        """``stepped.start``: start an action (a root, or a child for a parent link)."""
        call = StartCall.from_payload(payload)
        started = self.start_call(call, root=call.link is None).id
        if call.link is None and call.request is not None:
            discard_keyed(self.session_factory, call.request)  # later()'s entry: it ran
        return started

    def start_call(self, call: StartCall, root: bool) -> Action:
        """Start an action: before, keys, reuse, lane. Returns it (maybe not persisted)."""
        # A child's first delivery skips its link (a claimed one fails create's claim).
        first = call.link is not None and call.ancestry is not None and not _recovering.get()
        existing = None if first else self.starter.existing(call)
        if first and call.action is not None:  # its parent step wrote its row: read it
            written = self.starter.written(call.action)
            if written is not None:  # not fresh: repair or healing may have entered it
                return self._enter(written, call, fresh=False)
            existing = call.action  # no longer pending: carry on from its records
        if existing is not None:
            self._resume_existing(existing, call)
            return placeholder(existing)
        definition = self.lookup(call.actor[0], call.name)
        try:
            action = self.starter.prepare(definition, call, root)
        except ShortCircuit as short:
            self.drive(self.starter.finish_link(call, short.status))
            self.events.short_circuited(call.name, short.status, call.request, call.canvas)
            return self.starter.transient(definition, call, root, short.status)
        if action.checksum is not None:
            shared = self.starter.share(action, call)
            if shared is not None:
                return placeholder(shared)
        written = self.starter.create(action, call)
        if written is None:  # another delivery claimed the link first: read what it did
            call.ancestry = None
            return self.start_call(call, root)
        return self._enter(written, call, fresh=True)

    def _enter(self, written: Created, call: StartCall, fresh: bool) -> Action:
        """Enter the lane of a pending action this call holds the row of, and perform it
        when the lane lets it in."""
        created = written.action
        entry = self.entry.enter(created, fresh=fresh, lane_clear=written.lane_clear)
        performs = created.id in entry.effects.perform
        if performs:  # it begins in its first step's transaction: see beginning.py
            entry.effects.perform.remove(created.id)
        self.drive(entry.effects)
        if performs:
            self.drive(self.perform(created.id, Fresh(created, call.loaded_actor)))
            created.status = PERFORMING  # what it is by now (its steps ran or were sent)
        if entry.deadlock is not None:
            self.events.report_or_raise(entry.deadlock, created.id, None, "lane")
        return created

    def _resume_existing(self, action_id: int, call: StartCall) -> None:
        """A redelivered start: carry on from whatever the action's records say."""
        if action_id == FINISHED_WITHOUT_ROW:
            if call.link is not None:
                self.drive(self._follow_link(call.link))
            return
        action = self._read(action_id)
        if action is None:
            return
        if action.status == PENDING:
            self.drive(self.entry.enter(action).effects)
        else:
            self.resume(action_id)

    def resume(self, action_id: int) -> None:
        """``stepped.resume``: carry an action on from its records."""
        self.drive(self.carry_on(int(action_id)))

    def carry_on(self, action_id: int) -> Effects:
        """Whatever the action's records say comes next: perform (from the row read here,
        in its first step's transaction: ``beginning.Fresh``), steps, or its report."""
        action = self._read(action_id)
        if action is None:
            return Effects()
        if action.status == PENDING:
            return self.perform(action_id, Fresh(action))
        if action.status == PERFORMING:
            return self.performer.run_steps(action_id, self.delivery())
        return self.completer.finish(action_id, self.delivery())

    def advance(self, step_id: int) -> None:
        """``stepped.advance``: the chord body of a step."""
        self.drive(Effects().ready(int(step_id)))

    def finish_wait(self, link_id: int) -> None:
        """``stepped.wait``: a timed wait elapsed."""
        self._report_member(int(link_id), LinkKind.WAIT, ActionStatus.SUCCEEDED.value)

    def finish_member(self, link_id: int, outcome: str) -> None:
        """``stepped.member``: a plain task member ended (or its timeout elapsed first)."""
        self._report_member(int(link_id), LinkKind.TASK, outcome)

    def _report_member(self, link_id: int, kind: LinkKind, outcome: str) -> None:
        """Count a wait's or a task's outcome, once; a message naming a link of another
        kind (a forged or misrouted one) is ignored with a log line."""
        with self.session_factory() as s:
            found = s.scalar(select(ParentLink.kind).where(ParentLink.id == link_id))
        if found != kind:
            logger.warning("%s member %s: no such link (it is %s): ignored", kind, link_id, found)
            return
        successful = outcome == ActionStatus.SUCCEEDED.value
        reported = report_link(self.session_factory, link_id, outcome, successful, self.clock())
        self.drive(reported if reported.ready_steps else self._follow_link(link_id))

    def fire_timeout(self, action_id: int) -> bool:
        """``stepped.timeout``: time the action out if it still performs past its limit."""
        with self.session_factory() as s:
            action = s.get(Action, int(action_id))
            if action is None or action.status != PERFORMING or action.timeout_seconds is None:
                final = None if action is None else action.status
                if final == ActionStatus.TIMED_OUT.value and _recovering.get():
                    self.drive(Effects(finished=[int(action_id)]))
                return False
            started, limit, name = action.started_at, action.timeout_seconds, action.name
        if started is None:
            return False
        remaining = (started + timedelta(seconds=limit) - self.clock()).total_seconds()
        if remaining > 0:
            queue = self.routes.of_action(int(action_id)) if self.routes else None
            self.outboxes.send([timeout_message(int(action_id), name, remaining, queue)])
            return False
        self.complete(int(action_id), ActionStatus.TIMED_OUT.value)
        return True

    def complete_message(self, *args: Any) -> None:
        """``stepped.complete`` (``complete_later``): the outbound action performing now."""
        call = CompleteCall.from_args(args)
        with self.session_factory() as s:
            action_id = outbound_to_complete(s, call)
        if action_id is None:
            self.events.nothing_to_complete(call.name, call.actor, call.status)
            return
        self.complete(action_id, call.status)

    def complete(self, action_id: int, status: str) -> bool:
        """Complete an open action from outside; True when this call completed it."""
        completed, effects = self.completer.complete(action_id, status, self.delivery())
        self.drive(effects)
        return completed
