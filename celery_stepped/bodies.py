"""Step bodies: adapting the functions users write into ``(step, actor, *args)`` bodies.

A function-form action's function may take the ``step`` or not; a named action with no
steps calls the actor's method of its name; a job-backed action's generated step
enqueues its job.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .step import Step

__all__ = [
    "StepFn",
    "actor_class_of",
    "check_arguments",
    "function_step",
    "job_step",
    "method_step",
]

StepFn = Callable[..., Any]


def _accepts_step(fn: Callable[..., Any]) -> bool:
    """Function form: pass a ``Step`` first only when the function asks for one."""
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        return False
    first = params[0]
    annotation = first.annotation
    if isinstance(annotation, str):
        return annotation.split(".")[-1] == "Step" or first.name == "step"
    if getattr(annotation, "__name__", None) == "Step":
        return True
    return first.name == "step"


def _first_param_class(fn: Callable[..., Any], skip_step: bool) -> type | None:
    try:
        hints = inspect.get_annotations(fn, eval_str=True)
    except Exception:
        hints = {}
    params = list(inspect.signature(fn).parameters.values())
    index = 1 if skip_step else 0
    if len(params) <= index:
        return None
    annotation = hints.get(params[index].name)
    return annotation if isinstance(annotation, type) else None


def method_step(name: str) -> StepFn:
    def call_actor_method(step: Step, actor: Any, *args: Any) -> None:
        method = getattr(actor, name, None)
        if not callable(method):
            raise AttributeError(
                f"{type(actor).__name__} has no method {name!r} for the generated step"
            )
        method(*args)

    call_actor_method.__name__ = name
    return call_actor_method


def job_step(step: Step, actor: Any, *args: Any) -> None:
    step.enqueue_job()


def function_step(fn: Callable[..., Any]) -> StepFn:
    """Adapt a function-form body ``(actor, *args)`` or ``(step, actor, *args)``."""
    if _accepts_step(fn):
        return fn

    def body(step: Step, actor: Any, *args: Any) -> Any:
        return fn(actor, *args)

    body.__name__ = getattr(fn, "__name__", "step")
    body.__stepped_function__ = fn  # type: ignore[attr-defined]
    return body


def check_arguments(name: str, bodies: list[StepFn], args: list[Any]) -> None:
    """Raise TypeError when ``args`` do not fit every step body's signature (checked
    when the action is called, not when a worker runs it)."""
    for body in bodies:
        function = getattr(body, "__stepped_function__", None)
        # A function-form body is called as fn(actor, *args); any other as body(step, ...).
        target = body if function is None else function
        call = (None, *args) if function is not None else (None, None, *args)
        try:
            inspect.signature(target).bind(*call)
        except TypeError as exc:
            shown = getattr(target, "__name__", "step")
            raise TypeError(f"{name}: step {shown}{inspect.signature(target)}: {exc}") from None
        except ValueError:  # no signature to read (a builtin): nothing to check
            continue


def actor_class_of(fn: Callable[..., Any]) -> type | None:
    """The actor class a function-form action declares on its actor parameter."""
    return _first_param_class(fn, _accepts_step(fn))
