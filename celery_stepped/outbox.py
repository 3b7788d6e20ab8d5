"""The only way Stepped sends anything: an outbox per mode.

:class:`BrokerOutbox` publishes to Celery's broker; :class:`EagerOutbox` runs messages
in this process, breadth-first from one queue (``task_always_eager``);
:class:`JobQueue` holds them until a test performs them (``stepped.capture()``).
:class:`Outboxes` picks the one in force: the innermost capture, else eager mode,
else the broker. Local outboxes run a message through a ``runner`` the engine
provides, so this module knows nothing of the engine.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from uuid import uuid4

from celery import Celery
from celery.exceptions import Retry
from celery.result import AsyncResult
from kombu import Producer

try:  # kombu 5.7 and later
    from kombu.exceptions import BatchPublishError
except ImportError:  # pragma: no cover - older kombu has no batches, so never raises it

    class BatchPublishError(Exception):  # type: ignore[no-redef]
        """Stands in for kombu's: never raised without batches."""


from .members import send_member
from .messages import Message, MessageKind

__all__ = [
    "BrokerOutbox",
    "EagerOutbox",
    "EnqueuedJob",
    "JobQueue",
    "Outbox",
    "Outboxes",
    "run_task_locally",
]

logger = logging.getLogger("celery_stepped")
Runner = Callable[[Message], bool]
KINDS = tuple(k.value for k in MessageKind if k is not MessageKind.ADVANCE)


class Outbox(Protocol):
    """Where messages go. ``send`` keeps their order."""

    def send(self, messages: Sequence[Message]) -> None:
        """Send (or hold, or run) ``messages`` in order."""


class BrokerOutbox:
    """Publishes messages to the Celery broker (JSON, the Stepped queue by default)."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue

    def send(self, messages: Sequence[Message]) -> None:
        """Publish every message through one producer: several in one batch (one
        pipelined round trip on Redis, kombu's ``Producer.batch``) where the transport
        batches. A batch whose delivery kombu reports uncertain is published again one
        message at a time (every message is idempotent; the outbox keeps the entries
        until ``send`` returns)."""
        with self.app.producer_or_acquire() as producer:
            if len(messages) > 1 and _batches(producer):
                try:
                    with producer.batch():
                        self._publish(producer, messages)
                    return
                except BatchPublishError as exc:
                    logger.warning(
                        "stepped: a batch of %d message(s) failed (%r); sending each again",
                        len(messages),
                        exc,
                    )
            self._publish(producer, messages)

    def _publish(self, producer: Producer, messages: Sequence[Message]) -> None:
        for message in messages:
            if message.kind is MessageKind.TASK:
                link_id, payload = message.args
                queue = message.queue or self.queue
                send_member(
                    self.app, link_id, payload, queue, task_id=message.task_id, producer=producer
                )
                continue
            if message.kind is MessageKind.JOB:
                self.app.tasks[message.task].apply_async(
                    message.args,
                    countdown=message.countdown,
                    task_id=message.task_id,
                    producer=producer,
                )
                continue
            self.app.send_task(
                message.task,
                args=message.args,
                countdown=message.countdown,
                queue=message.queue or self.queue,
                serializer="json",
                task_id=message.task_id,
                producer=producer,
                shadow=message.label(),
                **_delivery(message),
            )


def _batches(producer: Producer) -> bool:
    """Whether ``producer`` can hold messages for one round trip (kombu 5.7 and later,
    on a transport that batches: Redis without its client's own retries)."""
    return hasattr(producer, "batch") and bool(producer.supports_batch_publish)


def _delivery(message: Message) -> dict[str, Any]:
    """Broker options a message sets only when given (``expires``, ``priority``)."""
    options = {"expires": message.expires, "priority": message.priority}
    return {k: v for k, v in options.items() if v is not None}


class EagerOutbox:
    """Runs messages in this process, breadth-first from one queue (no recursion).

    Timeouts are dropped: eager mode never fires them (API.md section 10).
    """

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._queue: deque[Message] = deque()
        self._draining = False

    def send(self, messages: Sequence[Message]) -> None:
        """Queue the messages; run the queue unless it already runs further up."""
        self._queue.extend(m for m in messages if m.kind is not MessageKind.TIMEOUT)
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue:
                self.runner(self._queue.popleft())
        except BaseException:
            self._queue.clear()
            raise
        finally:
            self._draining = False


@dataclass(frozen=True)
class EnqueuedJob:
    """A job held by a capture: ``kind``, ``name`` (action or task name), ``args``."""

    kind: str
    name: str
    args: list[Any]
    actor: tuple[str, str] | None = field(default=None, compare=False)


def _kinds(only: str | Iterable[str] | None) -> set[str] | None:
    if only is None:
        return None
    kinds = {only} if isinstance(only, str) else set(only)
    unknown = kinds - set(KINDS) - {MessageKind.ADVANCE.value}
    if unknown:
        raise ValueError(f"unknown job kind(s) {sorted(unknown)}; kinds are {KINDS}")
    return kinds


class JobQueue:
    """Jobs Stepped would have sent, held in this process until performed."""

    def __init__(self, runner: Runner, identify: Callable[[Any], tuple[str, str]]) -> None:
        self.runner = runner
        self.identify = identify
        self.messages: list[Message] = []

    def send(self, messages: Sequence[Message]) -> None:
        """Hold more messages."""
        self.messages.extend(messages)

    @property
    def enqueued(self) -> list[EnqueuedJob]:
        """The jobs still pending, oldest first."""
        return [
            EnqueuedJob(m.kind.value, m.name, list(m.display_args), _pair(m.actor))
            for m in self.messages
        ]

    def __len__(self) -> int:
        return len(self.messages)

    def take(self, only: str | Iterable[str] | None = None) -> list[Message]:
        """Remove and return the held messages of the ``only`` kinds (all by default)."""
        kinds = _kinds(only)
        taken = [m for m in self.messages if kinds is None or m.kind in kinds]
        self.messages = [m for m in self.messages if not (kinds is None or m.kind in kinds)]
        return taken

    def _perform(self, only: str | Iterable[str] | None) -> tuple[int, bool]:
        batch = self.take(only)
        progressed = False
        for message in batch:
            progressed = self.runner(message) or progressed
        return len(batch), progressed

    def perform(self, only: str | Iterable[str] | None = None) -> int:
        """Perform the jobs enqueued before this call; return how many ran."""
        return self._perform(only)[0]

    def perform_all(self, only: str | Iterable[str] | None = None) -> int:
        """Repeat :meth:`perform` until nothing is left; return how many ran.

        A timeout whose deadline has not passed by ``stepped.clock`` goes back in the
        queue; a round that only re-queued such timeouts ends the loop.
        """
        total = 0
        while True:
            count, progressed = self._perform(only)
            total += count
            if count == 0 or not progressed:
                return total


def _pair(actor: list[str] | None) -> tuple[str, str] | None:
    return (actor[0], actor[1]) if actor else None


class Outboxes:
    """The outbox in force: the innermost capture, else eager mode, else the broker."""

    def __init__(self, app: Celery, broker: Outbox, eager: Outbox) -> None:
        self.app = app
        self.broker = broker
        self.eager = eager
        self.captures: list[JobQueue] = []

    @property
    def local(self) -> bool:
        """True when messages stay in this process (capture or eager mode)."""
        return bool(self.captures) or bool(self.app.conf.task_always_eager)

    def current(self) -> Outbox:
        """The outbox new messages go to."""
        if self.captures:
            return self.captures[-1]
        return self.eager if self.app.conf.task_always_eager else self.broker

    def send(self, messages: Sequence[Message]) -> None:
        """Send messages in order through the outbox in force."""
        if messages:
            self.current().send(messages)

    def waiting(self, queue: str) -> int | None:
        """Messages the broker holds in ``queue`` (none while messages stay in this
        process); None when the broker cannot say."""
        if self.local:
            return 0
        try:
            with self.app.connection_for_read() as connection:
                channel = connection.default_channel
                # Redis: a declare only counts (it creates nothing), and a passive one
                # misses queues under a global_keyprefix (Kombu checks unprefixed keys).
                passive = connection.transport.driver_type != "redis"
                try:
                    declared = channel.queue_declare(queue=queue, passive=passive)
                except connection.channel_errors:  # no such queue: nothing in it
                    return 0
                return int(declared.message_count)
        except Exception:  # the broker is away: it cannot say
            return None

    def send_one(self, message: Message) -> AsyncResult:
        """Send one message and return its ``AsyncResult``."""
        self.send([message])
        return AsyncResult(message.task_id, app=self.app)

    @contextmanager
    def capture(self, queue: JobQueue) -> Iterator[JobQueue]:
        """Make ``queue`` the innermost capture; leftovers go to the enclosing outbox."""
        self.captures.append(queue)
        try:
            yield queue
        finally:
            self.captures.remove(queue)
            self.send(queue.take())


def run_task_locally(app: Celery, message: Message) -> Message | None:
    """Run a user's task (a job-backed action's job) through Celery's eager tracer.

    Returns the message to enqueue again when the task called ``self.retry()``.
    """
    from celery.app.trace import build_tracer

    task = app.tasks[message.task]
    tracer = build_tracer(task.name, task, eager=True, propagate=True, app=app)
    try:
        tracer(message.task_id, message.args, {}, _eager_request(message))
    except Retry:
        return replace(message, retries=message.retries + 1, task_id=str(uuid4()))
    return None


def _eager_request(message: Message) -> dict[str, Any]:
    return {
        "id": message.task_id,
        "retries": message.retries,
        "is_eager": True,
        "logfile": None,
        "loglevel": 0,
        "hostname": socket.gethostname(),
        "callbacks": None,
        "errbacks": None,
        "headers": None,
        "ignore_result": False,
        "args": message.args,
        "kwargs": {},
        "delivery_info": {
            "is_eager": True,
            "exchange": None,
            "routing_key": None,
            "priority": None,
        },
    }
