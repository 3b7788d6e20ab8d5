"""Outbound actions: finding the one an outside event completes.

``charge.complete_now(car)`` completes the newest ``performing`` outbound action named
``charge`` on ``car``; ``charge.complete_later(car)`` looks it up when its message
runs, so it also finds an action that started after the call.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .messages import CompleteCall
from .models import Action
from .statuses import ActionStatus

__all__ = ["outbound_to_complete", "performing_outbound"]


def performing_outbound(actor_type: str, actor_id: str, name: str) -> Any:
    """SELECT the newest performing outbound action ``name`` on the actor."""
    return (
        select(Action)
        .where(
            Action.actor_type == actor_type,
            Action.actor_id == actor_id,
            Action.name == name,
            Action.outbound.is_(True),
            Action.status == ActionStatus.PERFORMING.value,
        )
        .order_by(Action.id.desc())
        .limit(1)
    )


def outbound_to_complete(s: Session, call: CompleteCall) -> int | None:
    """The action a ``stepped.complete`` message completes: the outbound action
    performing now (or, in messages of earlier versions, the one they name)."""
    if call.actor is None or call.name is None:
        return call.action_id
    actor_type, actor_id = call.actor
    found = s.scalar(performing_outbound(actor_type, actor_id, call.name))
    return None if found is None else int(found.id)
