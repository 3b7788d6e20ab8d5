"""Decisions a transition returns instead of acting on them itself.

Transitions (starting, performing, completing, superseding, the join) change rows
and return :class:`Effects`; only the engine acts on them: it sends the messages
through the outbox and drives the ready steps and the actions a lane let perform.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .messages import Message
from .statuses import ActionStatus

__all__ = ["Delivery", "Effects", "after_last_step", "recover_final"]


@dataclass(frozen=True)
class Delivery:
    """How the current message runs.

    ``recovering``: it may repeat a run that died part-way (a redelivery or a retry),
    so finished work is followed up again. ``local``: messages stay in this process
    (eager mode or a capture).
    """

    recovering: bool = False
    local: bool = False
    #: True inside a task (or a locally run message): a crash there is finished by the
    #: message's redelivery, so follow-ups need no insurance entry in the outbox.
    in_worker: bool = False


@dataclass
class Effects:
    """What a transition decided: messages to send, steps to advance, actions to perform."""

    messages: list[Message] = field(default_factory=list)
    #: Steps whose last member reported: their chord body (``advance``) is due.
    ready_steps: list[int] = field(default_factory=list)
    #: Pending actions the lane let in on entry: they perform now, in this process.
    perform: list[int] = field(default_factory=list)
    #: Pending actions a released lane promoted: they perform next (lane handoff).
    handoff: list[int] = field(default_factory=list)
    #: Final actions whose completion effects (report to parents, lane release) are due.
    finished: list[int] = field(default_factory=list)
    #: Open actions to complete, with their final status.
    complete: list[tuple[int, str]] = field(default_factory=list)
    #: Outbox entries written with the decision: deleted once it was acted upon.
    staged: list[int] = field(default_factory=list)
    #: ``begin`` moved the action to performing in this call: ``(actor_type, name,
    #: outbound)``, so its first step runs without reading the action again.
    began: tuple[str, str, bool] | None = field(default=None, compare=False)
    #: ``(concurrency key, action id)`` of actions completed (and reported) in a step's
    #: own transaction: their lane place is released next.
    released: list[tuple[str, int]] = field(default_factory=list)

    def add(self, other: Effects) -> Effects:
        """Merge ``other`` into this one; returns self."""
        self.messages.extend(other.messages)
        self.ready_steps.extend(other.ready_steps)
        self.perform.extend(other.perform)
        self.handoff.extend(other.handoff)
        self.finished.extend(other.finished)
        self.complete.extend(other.complete)
        self.staged.extend(other.staged)
        self.released.extend(other.released)
        return self

    def ready(self, *step_ids: int | None) -> Effects:
        """Add ready steps (None entries ignored); returns self."""
        self.ready_steps.extend(s for s in step_ids if s is not None)
        return self

    def __bool__(self) -> bool:
        return bool(
            self.messages
            or self.ready_steps
            or self.perform
            or self.handoff
            or self.finished
            or self.complete
            or self.released
        )


def after_last_step(action_id: int, outbound: bool) -> Effects:
    """Every step done: a non-outbound action succeeds, an outbound one waits."""
    if outbound:
        return Effects()
    return Effects(complete=[(action_id, ActionStatus.SUCCEEDED.value)])


def recover_final(action_id: int, status: str | None, delivery: Delivery) -> Effects:
    """A redelivery found the action (``status``: None, it does not exist) final: redo
    its idempotent completion effects (its first run may have died after completing
    it, before telling its parents)."""
    if status is None or not ActionStatus(status).is_final or not delivery.recovering:
        return Effects()
    return Effects(finished=[action_id])
