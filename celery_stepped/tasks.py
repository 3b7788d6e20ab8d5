"""The internal Celery tasks: one per entry of the engine's handler table.

Every task takes only ids and JSON, is ``acks_late`` (a message is acknowledged after
it ran, so a killed worker's message is delivered again) and idempotent by action,
step and link ids (a second delivery finds the work recorded and changes nothing).
"""

from __future__ import annotations

import logging
import random
import threading
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, Task
from celery import signals as celery_signals
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import OperationalError

from .members import send_revoked_errbacks
from .routing import delivered_from

__all__ = [
    "STORE_ERRORS",
    "TASK_OPTIONS",
    "RetryPolicy",
    "Watch",
    "recovering",
    "register_tasks",
    "watch_worker",
]

logger = logging.getLogger("celery_stepped")
#: What a worker of each app watches (see :func:`watch_worker`).
_watched: weakref.WeakKeyDictionary[Celery, Watch] = weakref.WeakKeyDictionary()

TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "serializer": "json",
    "typing": False,
    "shared": False,
    "ignore_result": True,
    "bind": True,
    # Malformed messages are rejected in the worker's main process, before a pool gets them.
    "Strategy": "celery_stepped.validation:checked_strategy",
}
#: Stepped's own store errors: a locked SQLite file, a PostgreSQL deadlock or a lost
#: connection, a Redis hiccup. A message that meets one runs again from the start (every
#: task is idempotent), as a redelivery. An error raised by the user's code is never one
#: of these, whatever its class: it is handled per ``handle_exceptions``.
STORE_ERRORS = (OperationalError, RedisConnectionError, RedisTimeoutError)

Delivering = Callable[[bool], AbstractContextManager[None]]
GiveUp = Callable[[str, tuple[Any, ...], BaseException], None]


@dataclass(frozen=True)
class RetryPolicy:
    """How often a message that met a store error runs again: exponential backoff with
    jitter, at most ``max_retries`` times; then ``give_up`` fails the action it names."""

    max_retries: int = 8
    backoff: float = 1.0
    backoff_max: float = 60.0

    def countdown(self, retries: int) -> float:
        """Seconds before retry number ``retries + 1``."""
        return min(self.backoff_max, self.backoff * 2**retries) * random.uniform(0.5, 1.0)


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


def _task(
    app: Celery,
    name: str,
    handler: Callable[..., Any],
    delivering: Delivering,
    policy: RetryPolicy,
    give_up: GiveUp,
) -> Task:
    def run(self: Task, *args: Any) -> None:
        try:
            with delivering(recovering(self)), delivered_from(queue_of(self)):
                handler(*args)
        except STORE_ERRORS as exc:
            retries = self.request.retries or 0
            if retries >= policy.max_retries:
                logger.error("%s%r: giving up after %s retries: %r", name, args, retries, exc)
                give_up(name, args, exc)
                return
            countdown = policy.countdown(retries)
            raise self.retry(exc=exc, countdown=countdown, max_retries=None) from exc

    run.__name__ = name.rsplit(".", 1)[-1]
    run.__doc__ = handler.__doc__
    task: Task = app.task(name=name, **TASK_OPTIONS)(run)
    return task


def register_tasks(
    app: Celery,
    handlers: dict[str, Callable[..., Any]],
    delivering: Delivering,
    policy: RetryPolicy,
    give_up: GiveUp,
) -> dict[str, Task]:
    """Register one task per handler on ``app``; return them by name."""
    return {
        name: _task(app, name, handler, delivering, policy, give_up)
        for name, handler in handlers.items()
    }


@dataclass
class Watch:
    """What a worker of one app checks at start: Stepped's queue, and the outbox sweep."""

    queue: str
    sweep: Callable[[float], int]
    sweep_after: float
    sweep_every: float
    stop: threading.Event = field(default_factory=threading.Event)


def watch_worker(app: Celery, watch: Watch) -> None:
    """At worker start: warn when no Stepped queue is consumed; sweep the outbox then and
    every ``sweep_every`` seconds (in a daemon thread of the worker's main process)."""
    _watched[app] = watch


def _check_queues(app: Celery, queue: str) -> None:
    consumed = set(app.amqp.queues.consume_from or app.amqp.queues)
    if queue not in consumed:
        logger.warning(
            "this worker consumes %s but not Stepped's queue %r: trees will wait; "
            "start it with -Q %s",
            ", ".join(sorted(consumed)) or "no queue",
            queue,
            ",".join([queue, *sorted(consumed)]),
        )


def _check_content(app: Celery) -> None:
    """Pickle lets a forged message run code in any task, Stepped's included."""
    accepted = {str(c).lower() for c in (app.conf.accept_content or ())}
    if accepted & {"pickle", "application/x-python-serialize"}:
        logger.warning(
            "this worker accepts pickle (accept_content=%s): anyone who can write to the "
            "broker can run code in it. Stepped sends JSON only; accept ['json'] unless "
            "another task needs pickle (see the README's security section)",
            sorted(accepted),
        )


def _sweep(watch: Watch) -> None:
    try:
        sent = watch.sweep(watch.sweep_after)
    except Exception:  # a database or broker hiccup: the next round tries again
        logger.exception("stepped outbox sweep failed")
        return
    if sent:
        logger.warning(
            "stepped outbox sweep sent %s message(s) again: left unsent by a crash, or a "
            "later() whose start had not run yet (a redelivery is harmless)",
            sent,
        )


def _sweep_forever(watch: Watch, stop: threading.Event) -> None:
    _sweep(watch)
    while not stop.wait(watch.sweep_every):
        _sweep(watch)


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    watch = _watched.get(app) if app is not None else None
    if app is None or watch is None:
        return
    _check_queues(app, watch.queue)
    _check_content(app)
    # A new event per worker start: a second worker of the same app in one process (a
    # test's in-process worker) sweeps again after the first one's shutdown set its event.
    watch.stop = threading.Event()
    name = "stepped-outbox-sweep"
    args = (watch, watch.stop)
    threading.Thread(target=_sweep_forever, args=args, name=name, daemon=True).start()


def _on_worker_shutdown(**_: Any) -> None:
    for watch in list(_watched.values()):
        watch.stop.set()


celery_signals.worker_ready.connect(_on_worker_ready, weak=False)
celery_signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
celery_signals.task_revoked.connect(send_revoked_errbacks, weak=False)
