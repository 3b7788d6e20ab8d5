"""Plain Celery tasks as members of a step's join: ``step.task(send_email.s(user_id))``.

A task member is a :class:`~celery_stepped.models.ParentLink` of kind ``task``; its
``call`` holds the user's signature (JSON) and its ``timeout``. The signature is sent
with two internal callbacks, ``stepped.member(link_id, "succeeded")`` as ``link`` and
``stepped.member(link_id, "failed")`` as ``link_error`` (immutable: Celery's errback
call adds the failed task's id only to mutable signatures). A revoked or expired task
runs no errback in Celery, so the ``task_revoked`` receiver here sends it. A
``timeout=`` is a delayed ``stepped.member(link_id, "timed_out")``. Whichever
report comes first counts; the join's guarded ``waiting -> done`` update makes every
later one (a redelivered task, the timeout after success) change nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from celery import Celery, Task
from celery.canvas import Signature, signature
from sqlalchemy import select
from sqlalchemy.orm import Session

from .messages import (
    Message,
    StartCall,
    member_message,
    start_message,
    task_message,
    wait_message,
)
from .models import ParentLink
from .statuses import ActionStatus, LinkKind, LinkState

__all__ = [
    "MEMBER_TASK",
    "link_messages",
    "member_callback",
    "member_links",
    "send_member",
    "send_revoked_errbacks",
    "task_call",
    "task_member_messages",
    "task_member_view",
    "task_outcome",
    "unclaimed_links",
]

#: The internal task a task member reports through (``messages.TaskName.MEMBER``).
MEMBER_TASK = "stepped.member"
SUCCEEDED, FAILED = ActionStatus.SUCCEEDED.value, ActionStatus.FAILED.value


def member_links(
    step_id: int, intents: Iterable[Any], ancestry: str, now: datetime
) -> list[ParentLink]:
    """The link rows of a step's members (``step.do/on/wait/task`` intents: ``kind`` and
    ``call``); a child's call carries ``ancestry``, its own (see ``Starter.create``)."""
    return [
        ParentLink(
            step_id=step_id,
            kind=str(intent.kind),
            state=LinkState.WAITING.value,
            call={**intent.call, "ancestry": ancestry}
            if intent.kind == LinkKind.ACTION
            else intent.call,
            created_at=now,
            updated_at=now,
        )
        for intent in intents
    ]


def task_call(sig: Any, timeout: float | int | timedelta | None) -> dict[str, Any]:
    """The link's ``call`` for ``step.task(sig, timeout=...)``; TypeError when the
    signature is not a task signature or its arguments are not JSON."""
    if not isinstance(sig, Signature) or not isinstance(sig.get("task"), str):
        raise TypeError("step.task() takes a Celery signature of one task, e.g. send.s(1)")
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0
    ):
        raise TypeError("step.task(timeout=) takes positive seconds or a timedelta")
    try:
        plain = json.loads(json.dumps(dict(sig)))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"step.task(): the signature must be JSON-serialisable: {exc}") from exc
    return {"signature": plain, "timeout": None if seconds is None else float(seconds)}


def task_member_messages(
    link_id: int, call: dict[str, Any], queue: str | None = None
) -> list[Message]:
    """The messages of one task member: the task, and its timeout when it has one."""
    messages = [task_message(link_id, call, queue)]
    timeout = call.get("timeout")
    if timeout is not None:
        timed_out = ActionStatus.TIMED_OUT.value
        messages.append(member_message(link_id, timed_out, countdown=float(timeout), queue=queue))
    return messages


def member_callback(app: Celery, link_id: int, outcome: str, queue: str) -> Signature:
    """``stepped.member(link_id, outcome)`` as an immutable signature on ``queue``."""
    return app.signature(
        MEMBER_TASK, args=(link_id, outcome), immutable=True, queue=queue, serializer="json"
    )


def send_member(
    app: Celery, link_id: int, payload: dict[str, Any], queue: str, **opts: Any
) -> None:
    """Send the user's signature with the member's ``link`` and ``link_error``."""
    sig = signature(payload, app=app).clone()
    sig.link(member_callback(app, link_id, SUCCEEDED, queue))
    sig.link_error(member_callback(app, link_id, FAILED, queue))
    sig.apply_async(**opts)


def task_outcome(app: Celery, payload: dict[str, Any], task_id: str) -> str:
    """Run the user's signature in this process (eager mode, captures): its outcome."""
    result = signature(payload, app=app).apply(task_id=task_id, throw=False)
    return SUCCEEDED if result.successful() else FAILED


def send_revoked_errbacks(sender: Task | None = None, request: Any = None, **_: Any) -> None:
    """``task_revoked`` receiver: a revoked or expired member counts as failed.

    Celery stores a revoked task's state but calls no errback (worker.request
    ``_announce_revoked``), so the member's own errback is sent here.
    """
    errbacks = getattr(request, "errbacks", None) or []
    if sender is None:
        return
    for errback in errbacks:
        if isinstance(errback, dict) and errback.get("task") == MEMBER_TASK:
            signature(errback, app=sender.app).apply_async()


def task_member_view(
    call: dict[str, Any], state: str, started: datetime, ended: datetime
) -> dict[str, Any]:
    """What ``views`` shows of a task member: task name, arguments, timeout, timings."""
    sig = dict(call.get("signature") or {})
    done = state != "waiting"
    return {
        "name": sig.get("task"),
        "args": list(sig.get("args") or []),
        "kwargs": dict(sig.get("kwargs") or {}),
        "timeout": call.get("timeout"),
        "started_at": started.isoformat(),
        "completed_at": ended.isoformat() if done else None,
        "duration_seconds": (ended - started).total_seconds() if done else None,
    }


def unclaimed_links(s: Session, step_id: int) -> list[ParentLink]:
    """The step's child links no start has claimed yet (detached from ``s``)."""
    links = list(
        s.scalars(
            select(ParentLink).where(
                ParentLink.step_id == step_id,
                ParentLink.state == LinkState.WAITING.value,
                ParentLink.action_id.is_(None),
                ParentLink.kind == LinkKind.ACTION.value,
            )
        ).all()
    )
    for link in links:
        s.expunge(link)
    return links


def link_messages(
    links: list[ParentLink], queue: str | None, queue_of: Callable[[str, str], str | None]
) -> list[Message]:
    """The chord header of a step: one message per member link (``queue``: the step's
    action's, for its waits and task reports; ``queue_of(actor_type, name)``: a child's)."""
    messages = []
    for link in links:
        call = dict(link.call or {})
        if link.kind == LinkKind.WAIT:
            messages.append(wait_message(link.id, float(call.get("seconds", 0)), queue))
            continue
        if link.kind == LinkKind.TASK:
            messages.extend(task_member_messages(link.id, call, queue))
            continue
        start = StartCall(call["actor"], call["name"], call["args"], link.id, call.get("request"))
        start.ancestry = call.get("ancestry")
        start.action = link.action_id  # its parent step wrote its row (``child_rows``)
        messages.append(start_message(start, queue_of(start.actor[0], start.name)))
    return messages
