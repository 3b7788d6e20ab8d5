"""A step's members as its body asked for them (``step.do/on/wait/task``, a job): their
link rows, written in the body's transaction, and the messages that start them (the
chord header of the step), sent after its commit; a redelivered step's members that no
delivery claimed yet, sent again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy.orm import Session

from .child_rows import write_children
from .effects import Delivery
from .members import link_messages, member_links, unclaimed_links
from .messages import Message, job_message
from .models import ParentLink, Step
from .step import Step as StepContext
from .step_index import insert_links, move_index

__all__ = ["StepMembers"]


class StepMembers:
    """Writing a step's members and building their messages (``queue_of``: an action's
    queue, where its waits and task reports go)."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        queue_of: Callable[[str, str], str | None],
        clock: Callable[[], datetime],
    ) -> None:
        self.session_factory = session_factory
        self.queue_of = queue_of
        self.clock = clock

    def write(self, s: Session, step: Step, context: StepContext) -> list[Message]:
        """The step's join members as rows (with the pending rows of its plain children:
        :mod:`~celery_stepped.child_rows`); the messages that start them (and its job)."""
        action, now = context.action, self.clock()
        if step.definition_index > action.current_step_index:  # Core: no ORM flush of it
            move_index(s, action.id, step.definition_index, now)
        messages: list[Message] = []
        if any(intent.kind == "job" for intent in context.intents):
            messages.append(job_message(action.id, str(action.job)))
        links = member_links(step.id, context.members, f"{action.ancestry}{action.id},", now)
        rows = [None if intent.row is None else intent.row() for intent in context.members]
        write_children(s, links, rows, now)
        insert_links(s, links)
        return messages + self.messages(links, self.queue_of(action.actor_type, action.name))

    def messages(self, links: list[ParentLink], queue: str | None = None) -> list[Message]:
        """The chord header of a step: one message per member link (``queue``: the step's
        action's, for its waits and task reports)."""
        return link_messages(links, queue, self.queue_of)

    def unclaimed(self, step_id: int, delivery: Delivery) -> list[Message]:
        """A redelivered step: the members no delivery has claimed yet, sent again."""
        if delivery.local:
            return []
        with self.session_factory() as s:
            links = unclaimed_links(s, step_id)
        return self.messages(links)
