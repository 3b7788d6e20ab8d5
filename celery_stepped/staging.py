"""The durable half of the outbox: messages staged in SQL with the state change.

A transition writes the messages it decides, and an *insurance* message for each
follow-up it leaves to the engine (``stepped.advance`` for a step whose last member
reported, ``stepped.resume`` for an action that completed), as
:class:`~celery_stepped.models.OutboxEntry` rows in its own transaction. The engine
sends the messages after the commit, runs the follow-ups, and only then deletes the
entries. Whatever a crash (``kill -9``) left behind is sent again by a sweep: at worker
start and periodically (every message is idempotent, and a swept message runs as a
redelivery).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, bindparam, delete, insert, select
from sqlalchemy.orm import Session

from .messages import Message, StartCall, TaskName
from .models import Action, OutboxEntry, ParentLink, Step

__all__ = ["Due", "as_redelivery", "discard", "discard_keyed", "due", "named_by", "stage"]

#: The hot statements, prebuilt on the table (Core: an ORM-enabled DELETE and INSERT
#: cost several times as much, for rows no session holds).
_OUTBOX = cast(Table, OutboxEntry.__table__)
_STAGE = insert(_OUTBOX).returning(_OUTBOX.c.id)  # ids in any order: a set to discard
_DISCARD = delete(_OUTBOX).where(_OUTBOX.c.id.in_(bindparam("ids", expanding=True)))
_DISCARD_KEYED = delete(_OUTBOX).where(_OUTBOX.c.key == bindparam("key"))


def stage(
    s: Session, messages: Iterable[Message], now: datetime, key: str | None = None
) -> list[int]:
    """Write ``messages`` in ``s``'s transaction; the entry ids (one INSERT each)."""
    rows = [{"message": m.to_dict(), "created_at": now, "key": key} for m in messages]
    if not rows:
        return []
    result = s.execute(_STAGE, rows)
    return list(result.scalars().all())


def discard(session_factory: Callable[[], Session], entry_ids: list[int]) -> None:
    """Delete entries whose messages were sent or whose follow-ups ran (one statement)."""
    if not entry_ids:
        return
    with session_factory() as s:
        s.execute(_DISCARD, {"ids": list(entry_ids)})
        s.commit()


def discard_keyed(session_factory: Callable[[], Session], key: str) -> None:
    """Delete the entries kept for request ``key`` (its start message has run)."""
    with session_factory() as s:
        s.execute(_DISCARD_KEYED, {"key": key})
        s.commit()


class Due(NamedTuple):
    """An entry the sweep finds: its message, when it was staged, and its key (a root's
    request id: a ``later()`` start kept until it runs; None: a crash left it unsent)."""

    id: int
    message: Message
    created_at: datetime
    key: str | None


def due(
    session_factory: Callable[[], Session], now: datetime, older_than: float, limit: int = 500
) -> list[Due]:
    """Entries older than ``older_than`` seconds: those a crash left unsent first, then
    the starts kept until they run, each oldest first (a backlog of kept starts does
    not hide a crash's leftovers)."""
    cutoff = now - timedelta(seconds=older_than)
    with session_factory() as s:
        rows = s.execute(
            select(OutboxEntry.id, OutboxEntry.message, OutboxEntry.created_at, OutboxEntry.key)
            .where(OutboxEntry.created_at <= cutoff)
            .order_by(OutboxEntry.key.is_not(None), OutboxEntry.id)
            .limit(limit)
        ).all()
    return [Due(row.id, Message.from_dict(row.message), row.created_at, row.key) for row in rows]


def as_redelivery(message: Message, created: datetime, now: datetime) -> Message:
    """A swept message: marked as a retry (its first run may have done part of the work),
    its countdown shortened by the time it already waited."""
    countdown = message.countdown
    if countdown is not None:
        countdown = max(0.0, countdown - (now - created).total_seconds())
    return replace(message, retries=max(message.retries, 1), countdown=countdown)


def named_by(
    session_factory: Callable[[], Session], task: str, args: tuple[Any, ...]
) -> tuple[int | None, int | None]:
    """``(action id, unclaimed link id)`` that an internal message is about."""
    with session_factory() as s:
        if task == TaskName.START:
            call = StartCall.from_payload(args[0])
            if call.link is None:
                return s.scalar(select(Action.id).where(Action.request_id == call.request)), None
            link = s.get(ParentLink, call.link)
            if link is None or link.action_id is not None:
                return (None if link is None else link.action_id), None
            return None, call.link
        if task == TaskName.ADVANCE:
            return s.scalar(select(Step.action_id).where(Step.id == int(args[0]))), None
        if task == TaskName.WAIT:
            of_link = select(Step.action_id).join(ParentLink, ParentLink.step_id == Step.id)
            return s.scalar(of_link.where(ParentLink.id == int(args[0]))), None
    return (None if args[0] is None else int(args[0])), None
