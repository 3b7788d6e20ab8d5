"""Status values of actions and steps (part of the public contract)."""

from __future__ import annotations

from enum import StrEnum


class ActionStatus(StrEnum):
    """Lifecycle of an :class:`~celery_stepped.models.Action`."""

    PENDING = "pending"
    PERFORMING = "performing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    TIMED_OUT = "timed_out"
    DEADLOCKED = "deadlocked"

    @property
    def is_final(self) -> bool:
        """True for every status an action never leaves."""
        return self not in (ActionStatus.PENDING, ActionStatus.PERFORMING)


class StepStatus(StrEnum):
    """Lifecycle of a :class:`~celery_stepped.models.Step`."""

    PENDING = "pending"
    PERFORMING = "performing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


FINAL_STATUSES: frozenset[str] = frozenset(s.value for s in ActionStatus if s.is_final)
#: Statuses an outside caller may complete an action with, and the after-callback keys.
COMPLETION_STATUSES: tuple[str, ...] = ("succeeded", "failed", "cancelled", "timed_out")


class LinkState(StrEnum):
    """State of a :class:`~celery_stepped.models.ParentLink` (one member of a step's join)."""

    #: The step waits on this member.
    WAITING = "waiting"
    #: The member's outcome was counted, once.
    DONE = "done"
    #: The step's own child was superseded; a copy of the link waits on the superseder.
    TRANSFERRED = "transferred"
    #: The slot of a superseded child, given up (counted as done) because the step that
    #: started it already waits on its superseder.
    RELEASED = "released"


class LinkKind(StrEnum):
    """What a step's join member is."""

    ACTION = "action"
    WAIT = "wait"
    TASK = "task"
