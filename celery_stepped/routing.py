"""Which queue an action's messages go to, and whether its step may run here.

An action defined with ``queue=`` (else the Stepped queue) receives on that queue
every message that runs its own code: its start, the advance of its steps, its waits,
its timeout, its task members' reports, a handoff's resume. Joins and handoffs advance
inline in whatever task finished the member; when that task came from another queue,
the step is sent to its action's queue instead, so a step body runs only on workers
that consume its action's queue.

:data:`current_queue` is the queue of the message being run (set by
:mod:`celery_stepped.tasks`); it is None outside a worker (eager mode, captures,
``now()``), where everything runs inline.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .messages import Message, resume_message
from .models import Action, Step

__all__ = ["Routes", "current_queue", "delivered_from", "queue_of_definition", "resume_messages"]

_queue: contextvars.ContextVar[str | None] = contextvars.ContextVar("stepped_queue", default=None)


def current_queue() -> str | None:
    """The queue the message being run came from (None outside a worker)."""
    return _queue.get()


@contextmanager
def delivered_from(queue: str | None) -> Iterator[None]:
    """Mark the code inside as running a message from ``queue``."""
    token = _queue.set(queue)
    try:
        yield
    finally:
        _queue.reset(token)


class Routes:
    """The queue of each action (its definition's ``queue=``, else the Stepped queue).

    Args:
        session_factory: sessions on the Stepped tables.
        queue_of: ``(actor_type, name) -> queue or None`` from the definitions.
        default: the Stepped queue.
    """

    def __init__(
        self,
        session_factory: Callable[[], Session],
        queue_of: Callable[[str, str], str | None],
        default: str,
    ) -> None:
        self.session_factory = session_factory
        self.queue_of = queue_of
        self.default = default

    def of_action(self, action_id: int) -> str | None:
        """The action's own queue; None for the Stepped queue."""
        with self.session_factory() as s:
            row = s.execute(
                select(Action.actor_type, Action.name).where(Action.id == action_id)
            ).first()
        return None if row is None else self.queue_of(row.actor_type, row.name)

    def of_step(self, step_id: int) -> str | None:
        """The queue of the step's action; None for the Stepped queue."""
        with self.session_factory() as s:
            action_id = s.scalar(select(Step.action_id).where(Step.id == step_id))
        return None if action_id is None else self.of_action(action_id)

    def elsewhere(self, *, action_id: int) -> str | None:
        """None when the action may run in this message; else its queue.

        Outside a worker everything runs here (no query).
        """
        if current_queue() is None:
            return None
        return self._unless_here(self.of_action(action_id))

    def elsewhere_for(self, actor_type: str, name: str) -> str | None:
        """:meth:`elsewhere` for an action whose definition the caller read (no query)."""
        return self._unless_here(self.queue_of(actor_type, name))

    def _unless_here(self, queue: str | None) -> str | None:
        """``queue`` (None: the Stepped queue), or None when this message came from it or
        from no queue at all (outside a worker)."""
        current = current_queue()
        queue = queue or self.default
        return None if current is None or queue == current else queue


def queue_of_definition(lookup: Callable[[str, str], Any]) -> Callable[[str, str], str | None]:
    """``(actor_type, name) -> queue`` read from the definitions found by ``lookup``."""

    def queue_of(actor_type: str, name: str) -> str | None:
        try:
            queue: str | None = lookup(actor_type, name).resolved("action_queue")
        except LookupError:  # no definition any more: the Stepped queue
            return None
        return queue

    return queue_of


def resume_messages(
    session_factory: Callable[[], Session], action_ids: list[int], routes: Routes | None
) -> list[Message]:
    """A ``stepped.resume`` for each action (a handoff sent on), on its own queue."""
    with session_factory() as s:
        # Whatever their status now: a resume carries any action on from its records.
        rows = s.execute(select(Action).where(Action.id.in_(action_ids))).scalars()
        queue_of = routes.queue_of if routes else (lambda *_: None)
        return [
            resume_message(
                a.id,
                a.name,
                a.arguments,
                [a.actor_type, a.actor_id],
                queue_of(a.actor_type, a.name),
            )
            for a in rows
        ]
