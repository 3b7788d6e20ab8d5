"""The internal Celery tasks: start, resume, advance, wait, timeout, complete.

Every task takes only ids and JSON, is ``acks_late`` (a message is acknowledged after
it ran, so a killed worker's message is delivered again) and idempotent by action,
step and link ids (a second delivery finds the work recorded and changes nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .canvas import ADVANCE, COMPLETE, RESUME, START, TIMEOUT, WAIT, Dispatcher
from .runtime import StartCall

if TYPE_CHECKING:
    from .extension import Stepped

__all__ = ["TASK_OPTIONS", "register_tasks"]

TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "serializer": "json",
    "typing": False,
    "shared": False,
    "ignore_result": True,
}


def register_tasks(stepped: Stepped) -> dict[str, Any]:
    """Register the internal tasks of ``stepped`` on its app; return them by name."""
    app, runtime = stepped.app, stepped.runtime
    worker = Dispatcher.worker_context

    @app.task(name=START, **TASK_OPTIONS)
    def start(payload: dict[str, Any]) -> None:
        """Start an action (a root, or a child for a parent link)."""
        with worker():
            runtime.start(StartCall.from_message(payload), root=payload.get("link") is None)

    @app.task(name=RESUME, **TASK_OPTIONS)
    def resume(action_id: int) -> None:
        """A pending action reached the front of its lane: perform it."""
        with worker():
            runtime.resume(int(action_id))

    @app.task(name=ADVANCE, **TASK_OPTIONS)
    def advance(step_id: int) -> None:
        """The chord body: close a step whose members all reported, run what follows."""
        with worker():
            runtime.handoff([int(step_id)])

    @app.task(name=WAIT, **TASK_OPTIONS)
    def wait(link_id: int) -> None:
        """A timed wait elapsed: count it for its step."""
        with worker():
            runtime.finish_wait(int(link_id))

    @app.task(name=TIMEOUT, **TASK_OPTIONS)
    def timeout(action_id: int) -> None:
        """Time the action out if it still performs past its limit."""
        with worker():
            runtime.fire_timeout(int(action_id))

    @app.task(name=COMPLETE, **TASK_OPTIONS)
    def complete(action_id: int | None, status: str) -> None:
        """Complete an action from outside (``complete_later``)."""
        with worker():
            runtime.complete_job(action_id, status)

    return {t.name: t for t in (start, resume, advance, wait, timeout, complete)}
