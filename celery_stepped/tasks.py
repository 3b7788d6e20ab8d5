"""The internal Celery tasks: one per entry of the engine's handler table.

Every task takes only ids and JSON, is ``acks_late`` (a message is acknowledged after
it ran, so a killed worker's message is delivered again) and idempotent by action,
step and link ids (a second delivery finds the work recorded and changes nothing).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from celery import Celery, Task
from celery import signals as celery_signals
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import OperationalError

from .members import send_revoked_errbacks
from .routing import delivered_from

__all__ = ["TASK_OPTIONS", "recovering", "register_tasks", "watch_worker_queues"]

logger = logging.getLogger("celery_stepped")
#: The Stepped queue of each app, for the worker-start check.
_queues: weakref.WeakKeyDictionary[Celery, str] = weakref.WeakKeyDictionary()

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

Delivering = Callable[[bool], AbstractContextManager[None]]


def recovering(task: Task) -> bool:
    """True when this delivery may repeat a run that died or failed part-way."""
    request = task.request
    delivery = request.delivery_info or {}
    return bool(delivery.get("redelivered") or request.retries)


def queue_of(task: Task) -> str | None:
    """The queue this delivery came from (its routing key), if the broker says."""
    delivery = task.request.delivery_info or {}
    queue = delivery.get("routing_key")
    return str(queue) if queue else None


def _task(app: Celery, name: str, handler: Callable[..., Any], delivering: Delivering) -> Task:
    def run(self: Task, *args: Any) -> None:
        with delivering(recovering(self)), delivered_from(queue_of(self)):
            handler(*args)

    run.__name__ = name.rsplit(".", 1)[-1]
    run.__doc__ = handler.__doc__
    task: Task = app.task(name=name, **TASK_OPTIONS)(run)
    return task


def register_tasks(
    app: Celery, handlers: dict[str, Callable[..., Any]], delivering: Delivering
) -> dict[str, Task]:
    """Register one task per handler on ``app``; return them by name."""
    return {name: _task(app, name, handler, delivering) for name, handler in handlers.items()}


def watch_worker_queues(app: Celery, queue: str) -> None:
    """Warn at worker start when the worker consumes none of Stepped's queues."""
    _queues[app] = queue


def _check_queues(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    queue = _queues.get(app) if app is not None else None
    if app is None or queue is None:
        return
    consumed = set(app.amqp.queues.consume_from or app.amqp.queues)
    if queue not in consumed:
        logger.warning(
            "this worker consumes %s but not Stepped's queue %r: trees will wait; "
            "start it with -Q %s",
            ", ".join(sorted(consumed)) or "no queue",
            queue,
            ",".join([queue, *sorted(consumed)]),
        )


celery_signals.worker_ready.connect(_check_queues, weak=False)
celery_signals.task_revoked.connect(send_revoked_errbacks, weak=False)
