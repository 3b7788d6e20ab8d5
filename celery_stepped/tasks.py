"""The internal Celery tasks: start, resume, advance, wait, timeout, complete.

Every task takes only ids and JSON, is ``acks_late`` (a message is acknowledged after
it ran, so a killed worker's message is delivered again) and idempotent by action,
step and link ids (a second delivery finds the work recorded and changes nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Task
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import OperationalError

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
    "bind": True,
    # A locked SQLite file, a PostgreSQL deadlock or a Redis hiccup: run again from the
    # start (every task is idempotent), in recovery mode.
    "autoretry_for": (OperationalError, RedisConnectionError, RedisTimeoutError),
    "retry_backoff": 1,
    "retry_backoff_max": 60,
    "retry_kwargs": {"max_retries": None},
}


def recovering(task: Task) -> bool:
    """True when this delivery may repeat a run that died or failed part-way."""
    request = task.request
    delivery = request.delivery_info or {}
    return bool(delivery.get("redelivered") or request.retries)


def register_tasks(stepped: Stepped) -> dict[str, Any]:
    """Register the internal tasks of ``stepped`` on its app; return them by name."""
    app, runtime = stepped.app, stepped.runtime
    worker = Dispatcher.worker_context

    @app.task(name=START, **TASK_OPTIONS)
    def start(self: Task, payload: dict[str, Any]) -> None:
        """Start an action (a root, or a child for a parent link)."""
        with worker(recovering(self)):
            runtime.start(StartCall.from_message(payload), root=payload.get("link") is None)

    @app.task(name=RESUME, **TASK_OPTIONS)
    def resume(self: Task, action_id: int) -> None:
        """A pending action reached the front of its lane: perform it."""
        with worker(recovering(self)):
            runtime.resume(int(action_id))

    @app.task(name=ADVANCE, **TASK_OPTIONS)
    def advance(self: Task, step_id: int) -> None:
        """The chord body: close a step whose members all reported, run what follows."""
        with worker(recovering(self)):
            runtime.handoff([int(step_id)])

    @app.task(name=WAIT, **TASK_OPTIONS)
    def wait(self: Task, link_id: int) -> None:
        """A timed wait elapsed: count it for its step."""
        with worker(recovering(self)):
            runtime.finish_wait(int(link_id))

    @app.task(name=TIMEOUT, **TASK_OPTIONS)
    def timeout(self: Task, action_id: int) -> None:
        """Time the action out if it still performs past its limit."""
        with worker(recovering(self)):
            runtime.fire_timeout(int(action_id))

    @app.task(name=COMPLETE, **TASK_OPTIONS)
    def complete(self: Task, action_id: int | None, status: str) -> None:
        """Complete an action from outside (``complete_later``)."""
        with worker(recovering(self)):
            runtime.complete_job(action_id, status)

    return {t.name: t for t in (start, resume, advance, wait, timeout, complete)}
