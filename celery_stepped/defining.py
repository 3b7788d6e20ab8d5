"""``app.stepped_action``: define actions in either form, registered on the Celery app."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, overload

from celery import Celery

from .bodies import actor_class_of, function_step
from .definition import Runner, SteppedAction
from .registry import Registry

__all__ = ["Definer"]

P = ParamSpec("P")


class Definer:
    """Builds :class:`SteppedAction` definitions and registers them (app and registry).

    It also builds the registry's implicit definitions (an actor's method run as a
    one-step action), so it hands the registry :meth:`implicit` on construction.
    """

    def __init__(self, app: Celery, registry: Registry, runner: Runner) -> None:
        self.app = app
        self.registry = registry
        self.runner = runner
        registry.allow_implicit(self.implicit)

    @overload
    def action(self, name_or_fn: Callable[Concatenate[Any, P], Any]) -> SteppedAction[P]: ...

    @overload
    def action(
        self,
        name_or_fn: str | None = None,
        *,
        actor: type | None = None,
        outbound: bool = False,
        timeout: Any = None,
        job: Any = None,
        concurrency_key: Any = None,
        checksum: Callable[..., Any] | None = None,
        checksum_key: Any = None,
        queue: str | None = None,
    ) -> Any: ...

    def action(
        self,
        name_or_fn: Any = None,
        *,
        actor: type | None = None,
        outbound: bool = False,
        timeout: Any = None,
        job: Any = None,
        concurrency_key: Any = None,
        checksum: Callable[..., Any] | None = None,
        checksum_key: Any = None,
        queue: str | None = None,
    ) -> Any:
        """Define an action (``app.stepped_action``): bare decorator, decorator factory,
        or ``app.stepped_action("name", actor=Car)`` returning the definition."""
        options = dict(
            outbound=outbound,
            timeout=timeout,
            job=job,
            concurrency_key=concurrency_key,
            checksum=checksum,
            checksum_key=checksum_key,
            queue=queue,
        )
        if callable(name_or_fn) and not isinstance(name_or_fn, str):
            return self.define_function(name_or_fn, None, actor, options)
        if isinstance(name_or_fn, str):
            return self.define(name_or_fn, actor, options)

        def decorate(fn: Callable[..., Any]) -> SteppedAction[Any]:
            return self.define_function(fn, name_or_fn, actor, options)

        return decorate

    def define_function(
        self,
        fn: Callable[..., Any],
        name: str | None,
        actor: type | None,
        options: dict[str, Any],
    ) -> SteppedAction[Any]:
        """Function form: ``fn`` is the first step; its actor annotation the actor class."""
        definition = self.define(name or fn.__name__, actor or actor_class_of(fn), options)
        definition.step(function_step(fn))
        definition.__doc__ = fn.__doc__
        return definition

    def define(self, name: str, actor: type | None, options: dict[str, Any]) -> SteppedAction[Any]:
        """Named form: a definition with no parts yet."""
        job = options.get("job")
        if job is not None and not hasattr(job, "apply_async"):
            raise TypeError("job= takes a Celery task")
        definition = self._build(name, actor, options)
        self.registry.add(definition)
        self._register_task(definition)
        return definition

    def implicit(self, actor_class: type, name: str) -> SteppedAction[Any]:
        """The implicit definition of ``name`` for ``actor_class`` (the registry caches
        it): one generated step calling the actor's method ``name``."""
        definition = self._build(name, actor_class, {}, implicit=True)
        self._register_task(definition)
        return definition

    def _build(
        self, name: str, actor: type | None, options: dict[str, Any], implicit: bool = False
    ) -> SteppedAction[Any]:
        """A definition of its own class (``implicit``: a class attribute, True for an
        implicit definition)."""
        attributes = {"__module__": __name__, "implicit": implicit}
        cls = type(f"SteppedAction_{name}", (SteppedAction,), attributes)
        definition: SteppedAction[Any] = cls(
            self.runner, self.registry, name, actor=actor, **options
        )
        return definition

    def _register_task(self, definition: SteppedAction[Any]) -> None:
        """The Celery task of the name: the first definition of it, unless that was an
        implicit one and this one is declared (calls dispatch by name either way)."""
        existing = self.app.tasks.get(definition.name)
        if existing is not None and getattr(existing, "implicit", False):
            if getattr(definition, "implicit", False):
                return
            self.app.tasks.unregister(definition.name)
            existing = None
        if existing is None:
            self.app.register_task(definition)
