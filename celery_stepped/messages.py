"""The messages Stepped sends: internal task names, one factory per message, routing.

A :class:`Message` is what a transition decides to send; an outbox (see
:mod:`celery_stepped.outbox`) sends it to the broker, runs it in this process (eager
mode) or holds it (``stepped.capture()``). Every internal message carries ids and
JSON only, so it is idempotent and readable in ``celery events``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from uuid import uuid4

__all__ = [
    "CompleteCall",
    "Message",
    "MessageKind",
    "StartCall",
    "TaskName",
    "advance_message",
    "complete_message",
    "insurance_message",
    "job_message",
    "member_message",
    "resume_message",
    "start_message",
    "task_message",
    "timeout_message",
    "wait_message",
]


class TaskName(StrEnum):
    """Names of the internal Celery tasks (all routed to the Stepped queue)."""

    START = "stepped.start"
    RESUME = "stepped.resume"
    ADVANCE = "stepped.advance"
    WAIT = "stepped.wait"
    TIMEOUT = "stepped.timeout"
    COMPLETE = "stepped.complete"
    MEMBER = "stepped.member"


class MessageKind(StrEnum):
    """What a message does, as ``capture()`` shows it (``EnqueuedJob.kind``)."""

    ACTION = "action"
    WAIT = "wait"
    TIMEOUT = "timeout"
    COMPLETE = "complete"
    JOB = "job"
    ADVANCE = "advance"
    #: A plain Celery task, member of a step's join (``step.task``).
    TASK = "task"
    #: A task member's report (``stepped.member``): its outcome, or its timeout.
    MEMBER = "member"


@dataclass
class Message:
    """One message: ``task`` with positional JSON ``args``.

    ``name`` is the action name (or the user's task name for a job), ``display_args``
    the arguments a person reads, ``actor`` the actor reference; ``queue`` None means
    the Stepped queue.
    """

    kind: MessageKind
    name: str
    task: str
    args: list[Any]
    countdown: float | None = None
    display_args: list[Any] = field(default_factory=list)
    actor: list[str] | None = None
    queue: str | None = None
    task_id: str = field(default_factory=lambda: str(uuid4()))
    retries: int = 0
    #: Seconds after which the broker's worker drops the message (a root's ``expires=``).
    expires: float | None = None
    #: Broker priority (a root's ``priority=``).
    priority: int | None = None

    def label(self) -> str:
        """A readable name for ``celery events`` and Flower: ``stepped.start trip(Car/1, 5)``."""
        actor = ["/".join(self.actor)] if self.actor else []
        args = ", ".join([*actor, *(_short(a) for a in self.display_args)])
        text = f"{self.task} {self.name}({args})"
        return text if len(text) <= 200 else text[:197] + "..."

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the outbox row): its fields as they are, not copied (the row
        is serialized as it is written; ``dataclasses.asdict`` deep-copied every
        argument first)."""
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "kind": MessageKind(data["kind"])})


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class StartCall:
    """Everything needed to start an action, as it travels in a ``stepped.start`` message."""

    actor: list[str]
    name: str
    args: list[Any]
    link: int | None = None
    request: str | None = None
    #: A root's Celery canvas (``link``, ``link_error``, ``chain``, ``chord``, ...),
    #: applied when it is final (:mod:`celery_stepped.results`).
    canvas: dict[str, Any] | None = None
    #: A child's ancestry as its parent link recorded it (sent with the start, so a first
    #: delivery needs not read the link; a redelivery reads it from the link).
    ancestry: str | None = field(default=None, compare=False)
    #: The actor object a caller in this process gave (``now()``; never sent): keys
    #: and checksum read it instead of loading the row again.
    given_actor: Any = field(default=None, compare=False, repr=False)
    #: The actor object the start loaded for the keys (never sent): the first step of
    #: an action that begins in the same call uses it again (``beginning.Fresh``).
    loaded_actor: Any = field(default=None, compare=False, repr=False)
    #: A child whose parent step wrote its pending row (:mod:`~celery_stepped.child_rows`):
    #: its id. Its start reads that row instead of writing one.
    action: int | None = field(default=None, compare=False)

    def payload(self) -> dict[str, Any]:
        """The JSON payload of the ``stepped.start`` message."""
        payload: dict[str, Any] = {
            "actor": self.actor,
            "name": self.name,
            "args": self.args,
            "link": self.link,
            "request": self.request,
        }
        if self.canvas:
            payload["canvas"] = self.canvas
        if self.link is not None and self.ancestry:
            payload["ancestry"] = self.ancestry
        if self.link is not None and self.action is not None:
            payload["action"] = self.action
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> StartCall:
        """Rebuild the call from a ``stepped.start`` payload."""
        link = payload.get("link")
        call = cls(
            list(payload["actor"]),
            payload["name"],
            list(payload.get("args") or []),
            link,
            payload.get("request"),
            payload.get("canvas"),
            payload.get("ancestry") if link is not None else None,
        )
        call.action = payload.get("action") if link is not None else None
        return call


def start_message(
    call: StartCall,
    queue: str | None = None,
    *,
    countdown: float | None = None,
    expires: float | None = None,
    priority: int | None = None,
) -> Message:
    """``stepped.start``: start an action (a root, or a child for a parent link)."""
    options: dict[str, Any] = {"task_id": call.request} if call.request else {}
    return Message(
        MessageKind.ACTION,
        call.name,
        TaskName.START,
        [call.payload()],
        countdown=countdown,
        display_args=call.args,
        actor=call.actor,
        queue=queue,
        expires=expires,
        priority=priority,
        **options,
    )


def resume_message(
    action_id: int, name: str, arguments: list[Any], actor: list[str], queue: str | None = None
) -> Message:
    """``stepped.resume``: carry a pending or performing action on from its records."""
    return Message(
        MessageKind.ACTION,
        name,
        TaskName.RESUME,
        [action_id],
        display_args=list(arguments),
        actor=actor,
        queue=queue,
    )


def insurance_message(action_id: int) -> Message:
    """``stepped.resume`` staged with a completion: if the process dies before the action
    reported and released its lane, a sweep sends it and the action finishes that."""
    return Message(MessageKind.ACTION, "resume", TaskName.RESUME, [action_id])


def advance_message(step_id: int, queue: str | None = None) -> Message:
    """``stepped.advance``: the body of a step's chord (its members all reported)."""
    return Message(MessageKind.ADVANCE, "advance", TaskName.ADVANCE, [step_id], queue=queue)


def wait_message(link_id: int, seconds: float, queue: str | None = None) -> Message:
    """``stepped.wait``: a timed wait of ``seconds`` elapsed."""
    return Message(
        MessageKind.WAIT,
        "wait",
        TaskName.WAIT,
        [link_id],
        countdown=seconds,
        display_args=[seconds],
        queue=queue,
    )


def timeout_message(
    action_id: int, name: str, countdown: float, queue: str | None = None
) -> Message:
    """``stepped.timeout``: check the action's timeout in ``countdown`` seconds."""
    return Message(
        MessageKind.TIMEOUT,
        name,
        TaskName.TIMEOUT,
        [action_id],
        countdown=countdown,
        display_args=[action_id],
        queue=queue,
    )


@dataclass
class CompleteCall:
    """What a ``stepped.complete`` message carries.

    ``complete_later`` sends ``[actor, name, status]``: the performing outbound action
    is looked up when the message runs. Messages of earlier versions carry
    ``[action_id, status]`` instead (``action_id`` set, ``actor`` and ``name`` None).
    """

    status: str
    actor: list[str] | None = None
    name: str | None = None
    action_id: int | None = None

    def args(self) -> list[Any]:
        """The positional arguments of the ``stepped.complete`` message."""
        return [self.actor, self.name, self.status]

    @classmethod
    def from_args(cls, args: tuple[Any, ...] | list[Any]) -> CompleteCall:
        """Rebuild the call from a message's args (either form)."""
        if len(args) == 3:
            actor, name, status = args
            return cls(str(status), list(actor), str(name))
        action_id, status = args
        return cls(str(status), action_id=None if action_id is None else int(action_id))


def complete_message(status: str, name: str, actor: list[str], queue: str | None = None) -> Message:
    """``stepped.complete``: complete the performing outbound action ``name`` on
    ``actor``, found when the message runs (``complete_later``)."""
    return Message(
        MessageKind.COMPLETE,
        name,
        TaskName.COMPLETE,
        CompleteCall(status, actor, name).args(),
        display_args=[status],
        actor=actor,
        queue=queue,
    )


def job_message(action_id: int, task_name: str) -> Message:
    """The user's Celery task of a job-backed action, called with the action id."""
    return Message(MessageKind.JOB, task_name, task_name, [action_id], display_args=[action_id])


def task_message(link_id: int, call: dict[str, Any], queue: str | None = None) -> Message:
    """A user's Celery signature, member ``link_id`` of a step (``step.task``).

    ``args`` is ``[link_id, signature]``; the outbox sends the signature with the
    member's callbacks (``stepped.member``) on ``queue`` (None: the Stepped queue).
    """
    sig = dict(call["signature"])
    return Message(
        MessageKind.TASK,
        str(sig["task"]),
        str(sig["task"]),
        [link_id, sig],
        display_args=list(sig.get("args") or []),
        queue=queue,
    )


def member_message(
    link_id: int, outcome: str, countdown: float | None = None, queue: str | None = None
) -> Message:
    """``stepped.member``: task member ``link_id`` ended with ``outcome`` (or timed out)."""
    return Message(
        MessageKind.MEMBER,
        "member",
        TaskName.MEMBER,
        [link_id, outcome],
        countdown=countdown,
        display_args=[outcome],
        queue=queue,
    )
