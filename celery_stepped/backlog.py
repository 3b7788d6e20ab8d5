"""Behind a backlog a message is late, not lost: what the sweep's healing asks of the
broker before it sends a member's message again or enters a child in its lane."""

from __future__ import annotations

from collections.abc import Callable

from .events import logger
from .messages import Message

__all__ = ["Backlog"]


class Backlog:
    """How many messages each queue holds, asked once per sweep (``waiting(queue)``:
    the broker's count, None when it cannot say)."""

    def __init__(self, waiting: Callable[[str | None], int | None]) -> None:
        self.waiting = waiting
        self._held: dict[str | None, int | None] = {}

    def idle(self, queue: str | None) -> bool:
        """True when the broker says ``queue`` holds nothing."""
        if queue not in self._held:
            self._held[queue] = self.waiting(queue)
        return self._held[queue] == 0

    def not_queued(self, messages: list[Message]) -> list[Message]:
        """Those of ``messages`` bound for a queue that holds nothing (the next sweep
        looks again at the rest)."""
        kept = [message for message in messages if self.idle(message.queue)]
        if len(kept) < len(messages):
            busy = sorted(str(q or "stepped") for q, n in self._held.items() if n != 0)
            logger.info(
                "stepped heal: %d member message(s) not sent again yet: queue(s) %s hold "
                "messages (or the broker cannot say)",
                len(messages) - len(kept),
                ", ".join(busy),
            )
        return kept
