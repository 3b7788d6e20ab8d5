"""Start records: what keys and ``before`` decided for one start message.

A ``stepped.start`` message may come twice (late acks, a retry after a crash, two
workers at once), but ``before`` runs once per action: its outcome (a final status,
or the arguments and keys to go on with) is written as a
:class:`~celery_stepped.models.StartRecord` in the transaction that commits
``before``'s own changes, keyed by the request id the message carries (a root's from
``later()``, a child's from its parent link). A later delivery replays it.

Every function here works inside the caller's session and does not commit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .messages import StartCall
from .models import Action, StartRecord
from .statuses import FINAL_STATUSES, ActionStatus

__all__ = ["add_record", "ended_in_before", "outcome_of", "recorded", "replay"]


def ended_in_before(action: Action) -> str | None:
    """The final status ``before`` gave the action (``cancel()``, ``complete()`` or any
    final ``action.status = ...``), or None when it goes on."""
    status = str(action.status)
    return status if status in FINAL_STATUSES else action._short_circuit


def _key(call: StartCall) -> str | None:
    """The record's key: None for ``now()``, whose call is never delivered twice."""
    return None if call.request is None else f"request:{call.request}"


def recorded(s: Session, call: StartCall) -> dict[str, Any] | None:
    """What keys and ``before`` decided for an earlier delivery of ``call``."""
    key = _key(call)
    if key is None:
        return None
    return s.scalar(select(StartRecord.outcome).where(StartRecord.key == key))


def add_record(s: Session, call: StartCall, outcome: dict[str, Any], now: datetime) -> None:
    """Add the record of ``call``'s outcome to the session (nothing for ``now()``)."""
    key = _key(call)
    if key is not None:
        s.add(StartRecord(key=key, outcome=outcome, created_at=now))


def outcome_of(action: Action, ended: str | None, arguments: list[Any]) -> dict[str, Any]:
    """What keys and ``before`` decided, as JSON (see :func:`replay`)."""
    return {
        "status": ended,
        "arguments": [] if ended else arguments,
        "concurrency_key": action.concurrency_key,
        "checksum_key": action.checksum_key,
        "timeout_seconds": action.timeout_seconds,
        "job": action.job,
    }


def replay(action: Action, outcome: dict[str, Any]) -> str | None:
    """Give the action what keys and ``before`` decided; the final status that ended
    it, or None when it goes on."""
    if outcome["status"] is not None:
        return str(outcome["status"])
    action.status = ActionStatus.PENDING.value  # only a final status is kept from before
    action.arguments = list(outcome["arguments"])
    action.concurrency_key = outcome["concurrency_key"]
    action.checksum_key = outcome["checksum_key"]
    action.timeout_seconds = outcome["timeout_seconds"]
    action.job = outcome["job"]
    return None
