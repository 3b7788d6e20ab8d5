"""``SteppedAction``: an action definition (and a Celery task) with its parts.

A definition holds ordered steps, ``before`` hooks, key and checksum blocks and after
callbacks. Calls dispatch by *name*: ``drive.now(truck)`` runs the definition found for
``(type(truck), "drive")`` along the MRO (see :mod:`celery_stepped.registry`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol

from celery import Task

from .bodies import StepFn, actor_class_of, function_step, job_step, method_step
from .canvas import SteppedSignature
from .statuses import COMPLETION_STATUSES

if TYPE_CHECKING:
    from celery.result import AsyncResult

    from .models import Action

__all__ = ["Definitions", "Runner", "SteppedAction"]

P = ParamSpec("P")
KeySpec = str | Sequence[str] | Callable[..., Any] | None
TimeoutSpec = int | float | timedelta | Callable[[Any], Any] | None


class Runner(Protocol):
    """What a definition calls to run its actions (the engine's client side)."""

    def start_now(self, name: str, actor: Any, args: list[Any]) -> Action:
        """Start a root action in this process."""

    def start_later(
        self, name: str, actor: Any, args: list[Any], options: dict[str, Any]
    ) -> AsyncResult:
        """Enqueue the start of a root action with Celery's call ``options``."""

    def dump_arguments(self, args: list[Any]) -> list[Any]:
        """Arguments as JSON, actors as references (TypeError otherwise)."""

    def result(self, task_id: str) -> AsyncResult:
        """The ``AsyncResult`` tracking the root action started by request ``task_id``."""

    def complete_outbound(self, actor: Any, name: str, status: str) -> Action | None:
        """Complete the performing outbound action ``name`` on ``actor``."""

    def complete_outbound_later(self, actor: Any, name: str, status: str) -> AsyncResult:
        """Enqueue completing the outbound action ``name`` performing on ``actor`` then."""

    def load_arguments(self, value: Any) -> Any:
        """Arguments with actor references loaded."""


class Definitions(Protocol):
    """Where definitions are registered (the :class:`~celery_stepped.registry.Registry`)."""

    def add(self, definition: SteppedAction[Any]) -> None:
        """Register (or replace) a definition."""

    def remove(self, definition: SteppedAction[Any]) -> None:
        """Forget a definition."""

    def own(self, actor_class: type, name: str) -> SteppedAction[Any] | None:
        """The definition registered on exactly ``actor_class``, if any."""


class SteppedAction(Task, Generic[P]):
    """An action definition; also a Celery task whose call starts the action.

    Built by ``app.stepped_action`` (``Stepped.action``). Attach parts with the
    decorators ``step``, ``prepend_step``, ``before``, ``concurrency_key``,
    ``checksum_key``, ``checksum``, ``succeeded``, ``failed``, ``cancelled``,
    ``timed_out`` and ``after``.
    """

    abstract = True
    acks_late = True
    serializer = "json"

    def __init__(
        self,
        runner: Runner,
        definitions: Definitions,
        action_name: str,
        *,
        actor: type | None = None,
        outbound: bool = False,
        timeout: TimeoutSpec = None,
        job: Any = None,
        concurrency_key: KeySpec = None,
        checksum: Callable[..., Any] | None = None,
        checksum_key: KeySpec = None,
        queue: str | None = None,
        parent: SteppedAction[Any] | None = None,
    ) -> None:
        _check_options(action_name, timeout, checksum)
        _check_key("concurrency_key", concurrency_key)
        _check_key("checksum_key", checksum_key)
        self.runner = runner
        self.definitions = definitions
        self.action_name = action_name
        self.name = f"stepped.action.{action_name}"
        self.actor_class = actor
        self.outbound = bool(outbound or job is not None)
        self.timeout_spec = timeout
        self.job = job
        self.concurrency_key_spec: KeySpec = concurrency_key
        self.checksum_key_spec: KeySpec = checksum_key
        self.checksum_fn = checksum
        self.action_queue = queue
        self.parent = parent
        self._steps: list[StepFn] = []
        self._prepended: list[StepFn] = []
        self._before: list[StepFn] = []
        self._after: dict[str, list[StepFn]] = {s: [] for s in COMPLETION_STATUSES}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task body directly; used on a function, it adopts it as a step."""
        if len(args) == 1 and not kwargs and inspect.isfunction(args[0]) and not self._steps:
            return self.adopt(args[0])
        return super().__call__(*args, **kwargs)

    def adopt(self, fn: Callable[..., Any]) -> SteppedAction[P]:
        """``@app.stepped_action("name")`` used as a decorator: ``fn`` is the first step.

        A definition without an actor class takes the one ``fn`` declares.
        """
        self.step(function_step(fn))
        if self.actor_class is None:
            owner = actor_class_of(fn)
            if owner is not None:
                self.definitions.remove(self)
                self.actor_class = owner
                self.definitions.add(self)
        return self

    # -- parts ---------------------------------------------------------------------

    def step(self, fn: StepFn) -> StepFn:
        """Append a step ``(step, actor, *args)``."""
        self._steps.append(fn)
        return fn

    def prepend_step(self, fn: StepFn) -> StepFn:
        """Insert a step ``(step, actor, *args)`` before all others."""
        self._prepended.insert(0, fn)
        return fn

    def before(self, fn: StepFn) -> StepFn:
        """Run ``fn(action, actor, *args)`` once before any step."""
        self._before.append(fn)
        return fn

    def concurrency_key(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Compute the lane key with ``fn(actor, *args)``."""
        self.concurrency_key_spec = fn
        return fn

    def checksum_key(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Compute the achievement key with ``fn(actor, *args)``."""
        self.checksum_key_spec = fn
        return fn

    def checksum(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Compute the checksum with ``fn(actor, *args)`` (JSON value or None)."""
        self.checksum_fn = fn
        return fn

    def succeeded(self, fn: StepFn) -> StepFn:
        """After callback ``(action, actor, *args)`` for ``succeeded``."""
        self._after["succeeded"].append(fn)
        return fn

    def failed(self, fn: StepFn) -> StepFn:
        """After callback ``(action, actor, *args)`` for ``failed``."""
        self._after["failed"].append(fn)
        return fn

    def cancelled(self, fn: StepFn) -> StepFn:
        """After callback ``(action, actor, *args)`` for ``cancelled``."""
        self._after["cancelled"].append(fn)
        return fn

    def timed_out(self, fn: StepFn) -> StepFn:
        """After callback ``(action, actor, *args)`` for ``timed_out``."""
        self._after["timed_out"].append(fn)
        return fn

    def after(self, *statuses: Any) -> Any:
        """After callback for several statuses (none: all four); usable bare."""
        if len(statuses) == 1 and callable(statuses[0]) and not isinstance(statuses[0], str):
            fn = statuses[0]
            for status in COMPLETION_STATUSES:
                self._after[status].append(fn)
            return fn
        names = [str(s) for s in statuses] or list(COMPLETION_STATUSES)
        for name in names:
            if name not in COMPLETION_STATUSES:
                raise ValueError(f"after() takes {', '.join(COMPLETION_STATUSES)}; got {name!r}")

        def attach(fn: StepFn) -> StepFn:
            for name in names:
                self._after[name].append(fn)
            return fn

        return attach

    def for_actor(self, actor_class: type) -> SteppedAction[P]:
        """The definition as extended for ``actor_class`` only."""
        existing = self.definitions.own(actor_class, self.action_name)
        if existing is not None and existing.parent is self:
            return existing
        if self.actor_class is not None and not issubclass(actor_class, self.actor_class):
            raise TypeError(
                f"{actor_class.__name__} is not a subclass of {self.actor_class.__name__}"
            )
        extended: SteppedAction[P] = SteppedAction(
            self.runner, self.definitions, self.action_name, actor=actor_class, parent=self
        )
        extended.outbound = self.outbound
        self.definitions.add(extended)
        return extended

    # -- resolved parts --------------------------------------------------------------

    def steps_for_run(self) -> list[StepFn]:
        """Every step body in order, generated ones included."""
        if self.parent is not None:
            return [*self._prepended, *self.parent.steps_for_run(), *self._steps]
        if self._steps:
            base = list(self._steps)
        elif self.job is not None:
            base = [job_step]
        else:
            base = [method_step(self.action_name)]
        return [*self._prepended, *base]

    def before_hooks(self) -> list[StepFn]:
        """``before`` hooks, the parent definition's first."""
        own = list(self._before)
        return [*self.parent.before_hooks(), *own] if self.parent is not None else own

    def after_callbacks(self, status: str) -> list[StepFn]:
        """After callbacks for ``status``, the parent definition's first."""
        own = list(self._after.get(status, []))
        return [*self.parent.after_callbacks(status), *own] if self.parent else own

    def resolved(self, attribute: str) -> Any:
        """An option, falling back to the parent definition's."""
        value = getattr(self, attribute)
        if value is None and self.parent is not None:
            return self.parent.resolved(attribute)
        return value

    # -- running -----------------------------------------------------------------------

    def now(self, actor: Any, *args: P.args, **kwargs: P.kwargs) -> Action:
        """Start the action in this process and return it (see API.md section 4)."""
        _no_kwargs(kwargs)
        return self.runner.start_now(self.action_name, actor, list(args))

    def later(self, actor: Any, *args: P.args, **options: P.kwargs) -> AsyncResult:
        """Enqueue the start of a root action; returns an ``AsyncResult`` tracking it.

        Keywords are Celery's call options (``canvas.CALL_OPTIONS``); others raise TypeError.
        """
        return self.runner.start_later(self.action_name, actor, list(args), dict(options))

    def complete_now(self, actor: Any, status: str = "succeeded") -> Action | None:
        """Complete the performing outbound action of this name on ``actor``."""
        return self.runner.complete_outbound(actor, self.action_name, status)

    def complete_later(self, actor: Any, status: str = "succeeded") -> AsyncResult:
        """Enqueue completing the outbound action of this name performing on ``actor`` then."""
        return self.runner.complete_outbound_later(actor, self.action_name, status)

    def signature(self, args: Any = None, *starargs: Any, **starkwargs: Any) -> SteppedSignature:
        """A :class:`SteppedSignature` for this action."""
        starkwargs.setdefault("app", self.app)
        if args:
            args = self.runner.dump_arguments(list(args))
        return SteppedSignature(self, args, *starargs, **starkwargs)

    subtask = signature

    def run(self, actor: Any, *args: Any) -> Any:
        """Celery entry point: a direct call or ``delay`` starts the action now."""
        if isinstance(actor, dict):
            actor = self.runner.load_arguments(actor)
            args = tuple(self.runner.load_arguments(list(args)))
        action = self.runner.start_now(self.action_name, actor, list(args))
        return action.id

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> AsyncResult:
        """``delay``/``apply_async`` enqueue the action like :meth:`later`, with the
        same options (and those Celery's canvas adds inside a chain, group or chord)."""
        args = list(args or ())
        if kwargs:
            _no_kwargs(kwargs)
        if not args:
            raise TypeError(f"{self.action_name} needs an actor as its first argument")
        return self.runner.start_later(self.action_name, args[0], args[1:], options)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> AsyncResult:
        """The result of a root start: tracks the action (see :mod:`celery_stepped.results`)."""
        return self.runner.result(task_id)

    def __repr__(self) -> str:
        owner = self.actor_class.__name__ if self.actor_class else "any actor"
        return f"<SteppedAction {self.action_name} on {owner}>"


def _check_options(action_name: Any, timeout: Any, checksum: Any) -> None:
    """Refuse bad definition options at once, with a message that says what is expected."""
    if not action_name or not isinstance(action_name, str):
        raise ValueError("an action needs a non-empty string name")
    if timeout is not None and not (
        isinstance(timeout, int | float | timedelta) or callable(timeout)
    ):
        raise TypeError("timeout must be seconds, a timedelta or a callable(actor)")
    if isinstance(timeout, bool):
        raise TypeError("timeout must be seconds, a timedelta or a callable(actor)")
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if isinstance(seconds, int | float) and not seconds > 0:
        raise ValueError(f"timeout must be more than 0 seconds, got {timeout!r}")
    if checksum is not None and not callable(checksum):
        raise TypeError("checksum must be a callable (actor, *args)")


def _check_key(option: str, value: Any) -> None:
    """A key is a string, a list/tuple of parts, a callable ``(actor, *args)`` or None."""
    if value is None or callable(value) or isinstance(value, str):
        return
    if isinstance(value, list | tuple) and all(
        isinstance(part, str | int) and not isinstance(part, bool) for part in value
    ):
        return
    raise TypeError(
        f"{option} takes a string, a list of parts (strings or ints), or a callable "
        f"(actor, *args); got {value!r}"
    )


def _no_kwargs(kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise TypeError(
            "stepped actions take positional arguments only; got " + ", ".join(sorted(kwargs))
        )
