"""The caller's side: start actions, complete them from outside, read them back.

:class:`Client` is what definitions (``drive.now``, ``drive.later``,
``charge.complete_now``) and the ``Stepped`` object call. It validates the call in
the caller, then hands it to the engine (``now``) or to the outbox (``later``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from celery.result import AsyncResult
from sqlalchemy import select
from sqlalchemy.orm import Session, make_transient_to_detached, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from .actors import REF, ActorRegistry, is_reference
from .bodies import check_arguments
from .canvas import call_options
from .engine import Engine
from .errors import ActionNotFound
from .messages import Message, StartCall, complete_message, start_message
from .models import Action, Step
from .outbound import performing_outbound
from .outbox import Outboxes
from .registry import Registry
from .results import ActionResult, Found, find_request
from .staging import discard, stage
from .statuses import COMPLETION_STATUSES, ActionStatus

if TYPE_CHECKING:
    from .definition import SteppedAction

__all__ = ["Client", "check_status"]


def check_status(status: str) -> None:
    """Refuse a status outside the completion statuses."""
    if status not in COMPLETION_STATUSES:
        raise ValueError(f"status must be one of {', '.join(COMPLETION_STATUSES)}")


def _as_loaded(action: Action) -> Action:
    """A pending root ``now()`` just wrote (every column set from the INSERT), detached
    as if loaded: it has no steps, and no parent step of its own (a step that shares it
    later is another caller's)."""
    make_transient_to_detached(action)
    set_committed_value(action, "steps", [])
    set_committed_value(action, "parent_steps", [])
    return action


class Client:
    """Starts, completes and reads actions for callers (implements ``definition.Runner``)."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        actors: ActorRegistry,
        registry: Registry,
        engine: Engine,
        outboxes: Outboxes,
        lookup: Callable[[str, str], SteppedAction[Any]],
        clock: Callable[[], datetime],
    ) -> None:
        self.clock = clock
        self.session_factory = session_factory
        self.actors = actors
        self.registry = registry
        self.engine = engine
        self.outboxes = outboxes
        self.lookup = lookup

    # -- starting --------------------------------------------------------------------

    def root_call(self, name: str, actor: Any, args: list[Any]) -> StartCall:
        """A root action's start call, validated in the caller (TypeError, UnknownAction)."""
        if actor is None:
            raise TypeError(f"{name} needs an actor")
        if is_reference(actor):  # from a stepped signature, dumped when it was built
            ref = list(actor[REF])
            definition = self.registry.find(self.actors.resolve(ref[0]).cls, name)
        else:
            definition = self.registry.find(type(actor), name)
            ref = list(self.actors.identify(actor))
        check_arguments(name, definition.steps_for_run(), list(args))
        call = StartCall(ref, name, self.actors.dump(list(args)))
        if not is_reference(actor) and self.actors.usable(actor):
            call.given_actor = actor
        return call

    def start_now(self, name: str, actor: Any, args: list[Any]) -> Action:
        """``SteppedAction.now``: start a root action in this process."""
        action = self.engine.start_call(self.root_call(name, actor, args), root=True)
        if action.id is None:
            return action
        if action.status == ActionStatus.PENDING and action.created_at is not None:
            return _as_loaded(action)  # the row as this call wrote it: no read-back
        return self.get_action(action.id)

    def start_later(
        self, name: str, actor: Any, args: list[Any], options: dict[str, Any] | None = None
    ) -> AsyncResult:
        """``SteppedAction.later``: enqueue the start of a root action.

        ``options`` are Celery's call options (``canvas.call_options``); ``queue=``
        routes the start message. The result tracks the root (``results.ActionResult``).
        """
        given = call_options(options or {}, self.engine.clock())
        call = self.root_call(name, actor, args)
        call.request = given.task_id or str(uuid4())
        call.canvas = given.canvas or None
        queue = given.queue or self.lookup(call.actor[0], name).resolved("action_queue")
        message = start_message(
            call,
            queue,
            countdown=given.countdown,
            expires=given.expires,
            priority=given.priority,
        )
        self.send_durably(message, keep_for=call.request)
        return self.result(call.request)

    def result(self, task_id: str) -> ActionResult:
        """The ``AsyncResult`` of the root started by request ``task_id``."""
        return ActionResult(task_id, find=self.find_request, app=self.outboxes.app)

    def find_request(self, request_id: str) -> Found | None:
        """The root action created by request ``request_id``, if any yet."""
        return find_request(self.session_factory, request_id)

    def dump_arguments(self, args: list[Any]) -> list[Any]:
        """Arguments as JSON, actors as references (TypeError otherwise)."""
        dumped: list[Any] = self.actors.dump(list(args))
        return dumped

    def send_durably(self, message: Message, keep_for: str | None = None) -> AsyncResult:
        """Stage ``message`` in SQL, send it, then drop the entry: a message the broker
        never got (it died meanwhile) is sent again by the outbox sweep. With
        ``keep_for`` (a root's request id) the entry stays until that start runs, so a
        start the broker had and lost with Redis is sent again too."""
        with self.session_factory() as s:
            staged = stage(s, [message], self.clock(), key=keep_for)
            s.commit()
        result = self.outboxes.send_one(message)
        if keep_for is None:
            discard(self.session_factory, staged)
        return result

    def load_arguments(self, value: Any) -> Any:
        """Arguments with actor references loaded."""
        return self.actors.load(value)

    # -- completing ------------------------------------------------------------------

    def complete(self, action_id: int, status: str) -> Action | None:
        """Complete one action; the completed action, or None when it was already final."""
        check_status(status)
        completed = self.engine.complete(action_id, status)
        if completed:
            return self.get_action(action_id)
        with self.session_factory() as s:
            if s.get(Action, action_id) is None:
                raise ActionNotFound(f"no action #{action_id}")
        return None

    def performing_outbound(self, actor: Any, name: str) -> Action | None:
        """The newest performing outbound action ``name`` on ``actor``."""
        with self.session_factory() as session:
            return session.scalar(performing_outbound(*self.actors.identify(actor), name))

    def complete_outbound(self, actor: Any, name: str, status: str) -> Action | None:
        """Complete the performing outbound action ``name`` on ``actor`` (or None)."""
        check_status(status)
        action = self.performing_outbound(actor, name)
        return None if action is None else self.complete(action.id, status)

    def complete_outbound_later(self, actor: Any, name: str, status: str) -> AsyncResult:
        """Enqueue completing the outbound action ``name`` on ``actor``: the one
        performing when the message runs (none then: the message does nothing)."""
        check_status(status)
        actor_ref = list(self.actors.identify(actor))
        queue = self.lookup(actor_ref[0], name).resolved("action_queue")
        return self.send_durably(complete_message(status, name, actor_ref, queue))

    # -- reading ---------------------------------------------------------------------

    def get_action(self, action_id: int) -> Action:
        """The action, detached, with its steps (and their children) loaded."""
        with self.session_factory() as session:
            action = session.scalar(
                select(Action)
                .where(Action.id == int(action_id))
                .options(
                    selectinload(Action.steps).selectinload(Step.actions),
                    selectinload(Action.parent_steps),
                )
            )
            if action is None:
                raise ActionNotFound(f"no action with id {action_id}")
            session.expunge_all()
        action._load_actor = self.actors.load_ref
        return action
