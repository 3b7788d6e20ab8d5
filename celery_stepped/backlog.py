"""Behind a backlog a message is late, not lost: what the sweep asks of the broker before
it sends a kept ``later()`` start or a member's message again, or enters a child in its
lane."""

from __future__ import annotations

from collections.abc import Callable

from .events import logger
from .messages import Message
from .staging import Due

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
        self._left("heal", "member message(s)", len(messages) - len(kept))
        return kept

    def sweepable(self, entries: list[Due]) -> list[Due]:
        """Outbox entries the sweep sends again: those a crash left unsent, and the
        ``later()`` starts kept until they run (keyed) whose queue holds nothing."""
        sent = [e for e in entries if e.key is None or self.idle(e.message.queue)]
        self._left("sweep", "later() start(s)", len(entries) - len(sent))
        return sent

    def _left(self, who: str, what: str, count: int) -> None:
        """Log the ``count`` messages left for the next sweep (none: nothing to say)."""
        if count:
            busy = sorted(str(q or "stepped") for q, n in self._held.items() if n != 0)
            logger.info(
                "stepped %s: %d %s not sent again yet: queue(s) %s hold messages "
                "(or the broker cannot say)",
                who,
                count,
                what,
                ", ".join(busy),
            )
