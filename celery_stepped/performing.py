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
from .beginning import Beginner, Fresh, Unbegun
from .completing import Settled, Settler
from .effects import Delivery, Effects
from .errors import ActorNotFound
from .events import Events, error_record, logger
from .join import close_step
from .members import link_messages, member_links, unclaimed_links
from .messages import Message, advance_message, job_message
from .models import Action, ParentLink, Step
from .staging import stage
from .statuses import ActionStatus, StepStatus
from .step import Step as StepContext
from .step_index import (
    Position,
    insert_links,
    insert_step,
    move_index,
    new_step_row,
    position_of,
    position_of_step,
    step_to_run,
    write_failed_step,
)

if TYPE_CHECKING:
    from .definition import SteppedAction

__all__ = ["Performer"]

PENDING, PERFORMING = ActionStatus.PENDING.value, ActionStatus.PERFORMING.value
SUCCEEDED, SUCCEEDED_STEP = ActionStatus.SUCCEEDED.value, StepStatus.SUCCEEDED.value
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
        check: Callable[[type, str], object],
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

    def begin(self, action_id: int, delivery: Delivery) -> Effects | None:
        """pending -> performing in its own transaction (:meth:`Beginner.begin`)."""
        return self.beginner.begin(action_id, delivery)

    def begin_and_run(self, fresh: Fresh, delivery: Delivery) -> Effects | None:
        """Begin an action this call created (``fresh``) in its first step's transaction
        and run its steps (:mod:`~celery_stepped.beginning`); None: the ordinary path
        (a checksum, whose achievement begin checks, or another delivery was first)."""
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
            self._close(s, step_id)
            found = position_of_step(s, step_id)
        if found is None:
            return Effects()
        action_id, at = found
        queue = None if route is None else route(at.actor_type, at.name)
        if queue is not None:  # its next body or after callbacks run on its own queue
            return Effects([advance_message(step_id, queue)])
        return self.run_steps(action_id, delivery, at)

    def run_steps(self, action_id: int, delivery: Delivery, at: Position | None = None) -> Effects:
        """Run steps until one waits (``at``: where it stands, when just read); the
        effects say what follows."""
        while True:
            at = self.position(action_id) if at is None else at
            if at is None or at.action_status != PERFORMING:
                return _recover_final(action_id, at, delivery)
            bodies = self.lookup(at.actor_type, at.name).steps_for_run()
            if at.step_id is None:
                return self._run_from(action_id, at.step_index, at.outbound, bodies, delivery)
            if at.step_open:  # performing, or failed by its body while its members run
                if at.pending:
                    return Effects(messages=self.unclaimed(at.step_id, delivery))
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
        fresh: Fresh | None = None,
    ) -> Effects:
        """Run bodies from ``index`` on while each closes at once (see step_index.py); the
        last one, closing at once, completes the action in its own transaction
        (``fresh``: the first one begins it)."""
        effects = Effects()
        while index < len(bodies):
            last = delivery if index == len(bodies) - 1 and not outbound else None
            ran = self.perform_step(action_id, index, bodies[index], effects, last, fresh)
            fresh = None
            if ran.outcome == "completed":
                return effects
            if ran.outcome != "done":
                return effects  # waiting: its members carry on; exists/stopped: nothing
            if ran.closed_as == StepStatus.FAILED.value:
                effects.complete.append((action_id, ActionStatus.FAILED.value))
                return effects
            index += 1
        return effects.add(_after_last_step(action_id, outbound))

    def close(self, step_id: int) -> None:
        """Close a step whose members all reported (once)."""
        with self.session_factory() as s:
            self._close(s, step_id)

    def _close(self, s: Session, step_id: int) -> None:
        """Close the step in ``s`` and commit; its signal if this call closed it."""
        status = close_step(s, step_id, self.clock())
        s.commit()
        if status is not None:
            self.events.step_completed(step_id, status)

    def perform_step(
        self,
        action_id: int,
        index: int,
        body: Callable[..., Any],
        effects: Effects,
        last: Delivery | None = None,
        fresh: Fresh | None = None,
    ) -> Ran:
        """Run one step body in one transaction; its messages go into ``effects``
        (``last``: :meth:`_settle_last`; ``fresh``: it begins its action, :meth:`_open`).
        The body runs before Stepped writes: on SQLite no write lock is held while it
        runs. "Already ran" is checked under a row lock of the action on PostgreSQL, so a
        body runs once per step there; on SQLite two deliveries at the very same moment
        may both run it, and the unique (action, index) row lets one of them commit."""
        started = self.clock()
        with self.session_factory() as s:
            opened = self._open(s, action_id, index, fresh, started)
            if isinstance(opened, Ran):
                return opened
            action, actor, messages = opened
            context = self._run_body(s, action, index, body, actor)
            if isinstance(context, dict):
                return self._failed_step(action_id, index, started, context, fresh, effects)
            if fresh is not None and s.get_bind().dialect.name == "sqlite":
                messages = self.beginner.fresh(s, fresh, started)  # after the body: see _open
            step = new_step_row(action_id, index, started, context, self.clock())
            try:
                insert_step(s, step)
            except IntegrityError:
                s.rollback()
                return Ran("exists")
            messages += self._write_members(s, step, context)
            effects.staged.extend(stage(s, messages, started))
            settled = self._settle_last(s, action, step, last)
            s.commit()
        effects.messages.extend(messages)
        if fresh is not None:
            self.beginner.started(action_id, action)
        return self._ran(action_id, index, step, settled, effects)

    def _open(
        self, s: Session, action_id: int, index: int, fresh: Fresh | None, now: datetime
    ) -> tuple[Action, Any, list[Message]] | Ran:
        """The action whose step ``index`` runs, its actor when already loaded, and the
        messages beginning it scheduled; or what stops the step from running.

        PostgreSQL: a second delivery waits here for the first one's commit (the row
        lock), then sees its Step row and does not run the body again. A ``fresh``
        action begins here on PostgreSQL (that takes the lock); on SQLite after its
        body, so no write lock is held while the body runs.
        """
        if fresh is None:
            action, ran = step_to_run(s, action_id, index)
            if action.status != PERFORMING:
                return Ran("stopped")
            return Ran("exists") if ran else (action, None, [])
        early = s.get_bind().dialect.name != "sqlite"
        messages = self.beginner.fresh(s, fresh, now) if early else []
        action = fresh.attach(s, now)
        action._load_actor = self.actors.load_ref
        return action, fresh.actor_in(s), messages

    def _settle_last(
        self, s: Session, action: Action, step: Step, last: Delivery | None
    ) -> Settled | None:
        """The last step closed at once: complete the action in the step's transaction
        (one commit for both). Only inside a task, whose redelivery finishes a crash
        before the lane release (outside one, ``Completer.complete`` releases the lane
        before its insurance entry is dropped). Not when the action has after
        callbacks: an unhandled exception in one rolls its completion back, and must
        not take the body's writes with it (the body would run again)."""
        if last is None or not last.in_worker or step.completed_at is None:
            return None
        if step.status != SUCCEEDED_STEP:
            return None
        if self.settler.callbacks(action.actor_type, action.name, SUCCEEDED):
            return None
        return self.settler.settle(s, action.id, SUCCEEDED, last, self.clock())

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
        fresh: Fresh | None,
        effects: Effects,
    ) -> Ran:
        """Write the failed step (``fresh``: its action begins with it, the body's
        transaction having rolled back)."""
        with self.session_factory() as s:
            messages = [] if fresh is None else self.beginner.fresh(s, fresh, started)
            effects.staged.extend(stage(s, messages, started))
            step_id = write_failed_step(s, action_id, index, started, self.clock(), error)
        if step_id is None:
            return Ran("exists")
        effects.messages.extend(messages)
        if fresh is not None:
            self.beginner.started(action_id, fresh.action)
        self.events.step_completed(step_id, StepStatus.FAILED.value)
        return Ran("done", StepStatus.FAILED.value)

    def _write_members(self, s: Session, step: Step, context: StepContext) -> list[Message]:
        """The step's join members as rows; the messages that start them (and its job)."""
        action, now = context.action, self.clock()
        if step.definition_index > action.current_step_index:  # Core: no ORM flush of it
            move_index(s, action.id, step.definition_index, now)
        messages: list[Message] = []
        if any(intent.kind == "job" for intent in context.intents):
            messages.append(job_message(action.id, str(action.job)))
        links = member_links(step.id, context.members, f"{action.ancestry}{action.id},", now)
        insert_links(s, links)
        return messages + self.member_messages(links, self.queue_of(action.actor_type, action.name))

    def member_messages(self, links: list[ParentLink], queue: str | None = None) -> list[Message]:
        """The chord header of a step: one message per member link (``queue``: the step's
        action's, for its waits and task reports)."""
        return link_messages(links, queue, self.queue_of)

    def unclaimed(self, step_id: int, delivery: Delivery) -> list[Message]:
        """A redelivered step: the members no delivery has claimed yet, sent again."""
        if delivery.local:
            return []
        with self.session_factory() as s:
            links = unclaimed_links(s, step_id)
        return self.member_messages(links)


def _after_last_step(action_id: int, outbound: bool) -> Effects:
    """Every step done: a non-outbound action succeeds, an outbound one waits."""
    if outbound:
        return Effects()
    return Effects(complete=[(action_id, ActionStatus.SUCCEEDED.value)])


def _recover_final(action_id: int, at: Position | None, delivery: Delivery) -> Effects:
    """A redelivery found the action final: redo its idempotent completion effects
    (its first run may have died after completing it, before telling its parents)."""
    if at is None or not ActionStatus(at.action_status).is_final or not delivery.recovering:
        return Effects()
    return Effects(finished=[action_id])
