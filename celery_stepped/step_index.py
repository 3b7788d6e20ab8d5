"""``Action.current_step_index``: the step an action is at.

As in Stepped, it is the index of the step performing, or of the last step that ran:
it moves to a step in the transaction that writes that step's row and never runs
past the last step (a one-step action ends at 0). Whether that step closed is on its
:class:`~celery_stepped.models.Step` row.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .models import Action, Step
from .statuses import StepStatus

__all__ = ["move_index", "ran_every_step"]


def move_index(action_id: int, index: int) -> Any:
    """UPDATE moving ``current_step_index`` on to the step at ``index`` (never back)."""
    return (
        update(Action)
        .where(Action.id == action_id, Action.current_step_index < index)
        .values(current_step_index=index)
    )


def ran_every_step(s: Session, action_id: int, index: int, step_count: int) -> bool:
    """True when the action's steps all ran and succeeded: the step at its
    ``current_step_index`` is the last one and closed as succeeded (an index past the
    last step, left by earlier versions, counts as done too)."""
    if index != step_count - 1:
        return index >= step_count
    status = s.scalar(
        select(Step.status).where(Step.action_id == action_id, Step.definition_index == index)
    )
    return status == StepStatus.SUCCEEDED.value
