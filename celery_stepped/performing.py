"""Performing an action: ``pending -> performing``, then its steps, one body at a time.

A step body runs in one transaction with the actor loaded; what it asked for
(``step.do/on/wait``) is written as the step's join members in that same
transaction, and the messages that start them are returned for the engine to send
after the commit. A step with no members closes at once and the next one runs in the
same call, without reading the action again.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from .actors import ActorRegistry
from .beginning import Along, Beginner, Closing, Fresh, Unbegun
from .completing import Settled, Settler
from .effects import Delivery, Effects, after_last_step, recover_final
from .errors import ActorNotFound
from .events import Events, error_record, logger
from .join import close_step
from .messages import Message, advance_message
from .models import Action, Step
from .staging import stage
from .statuses import ActionStatus, StepStatus
from .step import Step as StepContext
from .step_index import (
    Position,
    advance_position,
    insert_step,
    new_step_row,
    position_of,
    position_of_step,
    step_to_run,
    write_failed_step,
)
from .step_members import StepMembers

if TYPE_CHECKING:
    from .definition import SteppedAction

__all__ = ["Performer"]

PENDING, PERFORMING = ActionStatus.PENDING.value, ActionStatus.PERFORMING.value
SUCCEEDED = ActionStatus.SUCCEEDED.value
Lookup = Callable[[str, str], "SteppedAction[Any]"]
Route = Callable[[str, str], str | None]


class Ran(NamedTuple):
    """One step body's run: ``waiting`` (members sent), ``done`` (closed at once as
    ``status``), ``exists`` (another delivery ran it) or ``stopped`` (not performing)."""

    outcome: str
    closed_as: str | None = None


class Performer:
    """The perform transition of one Stepped instance."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        actors: ActorRegistry,
        lookup: Lookup,
        check: Callable[[type, str], SteppedAction[Any]],
        events: Events,
        clock: Callable[[], datetime],
    ) -> None:
        self.session_factory = session_factory
        self.actors = actors
        self.lookup = lookup
        self.check = check
        self.events = events
        self.clock = clock
        self.settler = Settler(actors, lookup, events)
        self.beginner = Beginner(session_factory, self.queue_of, events, clock)
        self.members = StepMembers(session_factory, self.queue_of, clock)

    def begin(self, action_id: int, delivery: Delivery) -> Effects | None:
        """pending -> performing in its own transaction (:meth:`Beginner.begin`)."""
        return self.beginner.begin(action_id, delivery)

    def begin_and_run(self, fresh: Fresh, delivery: Delivery) -> Effects | None:
        """Begin a pending action whose row this call holds (``fresh``) in its first
        step's transaction and run its steps (:mod:`~celery_stepped.beginning`); None:
        the ordinary path (a checksum, whose achievement begin checks, or another
        delivery was first)."""
        action = fresh.action
        if action.checksum is not None:
            return None
        bodies = self.lookup(action.actor_type, action.name).steps_for_run()
        try:
            return self._run_from(action.id, 0, action.outbound, bodies, delivery, fresh)
        except Unbegun:
            return None
        except BaseException:
            # As if it had begun on its own first: a retry or the sweep finds it
            # performing, its timeout staged (best effort: the store may be down).
            with suppress(Exception):
                self.begin(action.id, delivery)
            raise

    def run_first_steps(
        self, action_id: int, began: tuple[str, str, bool], delivery: Delivery
    ) -> Effects:
        """The steps of an action this call just began: it has no step row yet (a
        pending action never has one), so they run from the first without reading it."""
        actor_type, name, outbound = began
        bodies = self.lookup(actor_type, name).steps_for_run()
        return self._run_from(action_id, 0, outbound, bodies, delivery)

    def queue_of(self, actor_type: str, name: str) -> str | None:
        """The action's own queue: its waits, timeout and task reports go there."""
        queue: str | None = self.lookup(actor_type, name).resolved("action_queue")
        return queue

    # -- steps -------------------------------------------------------------------------

    def position(self, action_id: int) -> Position | None:
        """The action's status and index with the row of its current step."""
        with self.session_factory() as s:
            return position_of(s, action_id)

    def advance(self, step_id: int, delivery: Delivery, route: Route | None = None) -> Effects:
        """A step's members all reported: close it, then run what follows (``route``:
        the queue its action's code must run on, None for here: else it is sent there)."""
        with self.session_factory() as s:
            found, row = advance_position(s, step_id)
            if found is None:
                return Effects()
            action_id, at = found
            queue = None if route is None else route(at.actor_type, at.name)
            if queue is not None:  # its next body or after callbacks run on its own queue
                return Effects([advance_message(step_id, queue)])
            bodies = self.lookup(at.actor_type, at.name).steps_for_run()
            closing = at.closes_with_next(step_id, len(bodies))
            # Else: the last step, a failing one, or not the current one: close it alone.
            status = None if closing else self._close(s, step_id)
            found = position_of_step(s, step_id) if not closing and status is None else found
        if closing:  # closed in the next body's transaction
            index = at.step_index + 1
            closing_step = Closing(step_id, row)
            return self._run_from(action_id, index, at.outbound, bodies, delivery, closing_step)
        if found is None:
            return Effects()
        action_id, at = found
        if status is not None:  # closed by this call: where it stands now, without a read
            at = at._replace(step_status=status, step_open=False)
        return self.run_steps(action_id, delivery, at)

    def run_steps(self, action_id: int, delivery: Delivery, at: Position | None = None) -> Effects:
        """Run steps until one waits (``at``: where it stands, when just read); the
        effects say what follows."""
        while True:
            at = self.position(action_id) if at is None else at
            if at is None or at.action_status != PERFORMING:
                return recover_final(action_id, None if at is None else at.action_status, delivery)
            bodies = self.lookup(at.actor_type, at.name).steps_for_run()
            if at.step_id is None:
                return self._run_from(action_id, at.step_index, at.outbound, bodies, delivery)
            if at.step_open:  # performing, or failed by its body while its members run
                if at.pending:
                    return Effects(messages=self.members.unclaimed(at.step_id, delivery))
                self.close(at.step_id)
                at = None
                continue
            if at.step_status == StepStatus.FAILED.value:
                return Effects(complete=[(action_id, ActionStatus.FAILED.value)])
            return self._run_from(action_id, at.step_index + 1, at.outbound, bodies, delivery)

    def _run_from(
        self,
        action_id: int,
        index: int,
        outbound: bool,
        bodies: list[Any],
        delivery: Delivery,
        along: Along = None,
    ) -> Effects:
        """Run bodies from ``index`` on while each closes at once (see step_index.py); the
        last one, closing at once, completes the action in its own transaction
        (``along``: what the first one's transaction also writes)."""
        effects = Effects()
        while index < len(bodies):
            last = delivery if index == len(bodies) - 1 and not outbound else None
            ran = self.perform_step(action_id, index, bodies[index], effects, last, along)
            along = None
            if ran.outcome == "completed":
                return effects
            if ran.outcome != "done":
                return effects  # waiting: its members carry on; exists/stopped: nothing
            if ran.closed_as == StepStatus.FAILED.value:
                effects.complete.append((action_id, ActionStatus.FAILED.value))
                return effects
            index += 1
        return effects.add(after_last_step(action_id, outbound))

    def close(self, step_id: int) -> None:
        """Close a step whose members all reported (once)."""
        with self.session_factory() as s:
            self._close(s, step_id)

    def _close(self, s: Session, step_id: int) -> str | None:
        """Close the step in ``s`` and commit; its signal and status if this call closed it."""
        status = close_step(s, step_id, self.clock())
        s.commit()
        if status is not None:
            self.events.step_completed(step_id, status)
        return status

    def perform_step(
        self,
        action_id: int,
        index: int,
        body: Callable[..., Any],
        effects: Effects,
        last: Delivery | None = None,
        along: Along = None,
    ) -> Ran:
        """Run one step body in one transaction, its messages into ``effects`` (``last``:
        :meth:`_settle_last`; ``along``: ``beginning.Along``). The body runs before Stepped
        writes (on SQLite no write lock is held while it runs). On PostgreSQL a row lock
        makes a body run once per step; on SQLite two deliveries at the very same moment
        may both run it, and the unique (action, index) row lets one of them commit."""
        started = self.clock()
        with self.session_factory() as s:
            opened = self._open(s, action_id, index, along, started)
            if isinstance(opened, Ran):
                return opened
            action, actor, messages = opened
            context = self._run_body(s, action, index, body, actor)
            if isinstance(context, dict):
                return self._failed_step(action_id, index, started, context, along, effects)
            step = new_step_row(action_id, index, started, context, self.clock())
            settled = self._write(s, action, step, context, along, last, messages, effects)
            if isinstance(settled, Ran):
                return settled
            s.commit()
        effects.messages.extend(messages)
        self.beginner.committed(along)
        return self._ran(action_id, index, step, settled, effects)

    def _write(
        self,
        s: Session,
        action: Action,
        step: Step,
        context: StepContext,
        along: Along,
        last: Delivery | None,
        messages: list[Message],
        effects: Effects,
    ) -> Settled | Ran | None:
        """After the body, in its transaction: what ``along`` writes, the step's row, its
        members and their staged messages (into ``messages`` and ``effects``), and the
        completion it carries (:meth:`_settle_last`); ``Ran("exists")`` when another
        delivery wrote the step first (``s`` rolled back)."""
        started = step.started_at
        assert started is not None  # new_step_row sets it
        # The delivery the action completes with in this transaction, if it does.
        settling = last if self.settler.settles_with(action, step, last) else None
        # A fresh action on SQLite that completes with this step begins in its
        # completion's UPDATE (``Settler.settle``): one statement for both.
        began_at = started if settling and self.beginner.folds(s, along) else None
        after = [] if began_at else self.beginner.after_body(s, along, started)
        if after is None:
            return Ran("exists")
        messages += after
        try:
            insert_step(s, step)
        except IntegrityError:
            s.rollback()
            return Ran("exists")
        messages += self.members.write(s, step, context)
        effects.staged.extend(stage(s, messages, started))
        return None if settling is None else self._settle_last(s, action, settling, began_at)

    def _open(
        self, s: Session, action_id: int, index: int, along: Along, now: datetime
    ) -> tuple[Action, Any, list[Message]] | Ran:
        """The action whose step ``index`` runs, its actor when already loaded, and the
        messages beginning it scheduled; or what stops the step from running.

        PostgreSQL: a second delivery waits here for the first one's commit (the row
        lock), then sees its Step row and does not run the body again. A fresh action
        begins here on PostgreSQL (that takes the lock); on SQLite after its body, so no
        write lock is held while the body runs (``Beginner.before_body``).
        """
        action = along.attach(s) if isinstance(along, Closing) else None
        if action is not None:  # SQLite: the read that found its step closing gave it
            action._load_actor = self.actors.load_ref
            return action, None, []
        if not isinstance(along, Fresh):
            action, ran = step_to_run(s, action_id, index)
            if action.status != PERFORMING:
                return Ran("stopped")
            return Ran("exists") if ran else (action, None, [])
        messages = self.beginner.before_body(s, along, now)
        action = along.attach(s, now)
        action._load_actor = self.actors.load_ref
        return action, along.actor_in(s), messages

    def _settle_last(
        self, s: Session, action: Action, last: Delivery, began_at: datetime | None
    ) -> Settled | None:
        """The last step closed at once and ``Settler.settles_with`` it: complete the
        action in the step's transaction (``began_at``: it begins there too; Unbegun when
        it is no longer pending)."""
        settled = self.settler.settle(s, action.id, SUCCEEDED, last, self.clock(), began_at)
        if settled is None and began_at is not None:
            s.rollback()
            raise Unbegun(action.id)
        return settled

    def _ran(
        self, action_id: int, index: int, step: Step, settled: Settled | None, effects: Effects
    ) -> Ran:
        """After the step's commit: its events, and the completion it carried."""
        self.events.step_started(action_id, index)
        if step.completed_at is None:
            return Ran("waiting")
        self.events.step_completed(step.id, step.status)
        if settled is None:
            return Ran("done", step.status)
        self.settler.announce(action_id, SUCCEEDED, settled)
        effects.staged.extend(settled.staged)
        effects.released.append((settled.row.concurrency_key, action_id))
        effects.ready(*settled.ready)
        return Ran("completed")

    def _run_body(
        self, s: Session, action: Action, index: int, body: Callable[..., Any], actor: Any
    ) -> StepContext | dict[str, Any]:
        """The body's run: its context, or the error record of a handled exception (or
        of an actor that no longer exists: the step fails whatever is handled).
        ``actor``: already loaded in ``s``, or None."""
        try:
            if actor is None:
                actor = self.actors.load_ref(action.actor_type, action.actor_id, s)
            args = self.actors.load(action.arguments, s)
        except ActorNotFound as gone:
            s.rollback()
            logger.warning("action #%s %s: %s: it fails", action.id, action.name, gone)
            return error_record(gone)
        context = StepContext(s, action, actor, self.actors.dump, self.actors.identify, self.check)
        try:
            body(context, actor, *args)
        except Exception as exc:  # the user's code, whatever the class (their own queries too)
            return self._body_failed(s, exc, action.id, index)
        try:
            s.flush()  # the body's own writes: a constraint they break is the body's
        except OperationalError:
            raise  # the database (locked, deadlock, gone), not the body: run again
        except Exception as exc:
            return self._body_failed(s, exc, action.id, index)
        return context

    def _body_failed(
        self, s: Session, exc: Exception, action_id: int, index: int
    ) -> dict[str, Any]:
        s.rollback()
        self.events.report_or_raise(exc, action_id, index, "step")
        return error_record(exc)

    def _failed_step(
        self,
        action_id: int,
        index: int,
        started: datetime,
        error: dict[str, Any],
        along: Along,
        effects: Effects,
    ) -> Ran:
        """Write the failed step, and what ``along`` writes (the body's transaction
        rolled back)."""
        with self.session_factory() as s:
            messages = self.beginner.after_body(s, along, started, rolled_back=True)
            if messages is None:
                return Ran("exists")
            effects.staged.extend(stage(s, messages, started))
            step_id = write_failed_step(s, action_id, index, started, self.clock(), error)
        if step_id is None:
            return Ran("exists")
        effects.messages.extend(messages)
        self.beginner.committed(along)
        self.events.step_completed(step_id, StepStatus.FAILED.value)
        return Ran("done", StepStatus.FAILED.value)
