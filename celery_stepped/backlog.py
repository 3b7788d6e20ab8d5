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

    def not_queued(
        self, messages: list[Message], what: str = "heal: %d member message(s)"
    ) -> list[Message]:
        """Those of ``messages`` bound for a queue that holds nothing (the next sweep
        looks again at the rest; ``what`` names them in the log line, ``%d`` their count)."""
        kept = [message for message in messages if self.idle(message.queue)]
        if len(kept) < len(messages):
            busy = sorted(str(q or "stepped") for q, n in self._held.items() if n != 0)
            logger.info(
                "stepped %s not sent again yet: queue(s) %s hold messages "
                "(or the broker cannot say)",
                what % (len(messages) - len(kept)),
                ", ".join(busy),
            )
        return kept

    def sweepable(self, entries: list[Due]) -> list[Due]:
        """Outbox entries the sweep sends again: those a crash left unsent, and the
        ``later()`` starts kept until they run (keyed) whose queue holds nothing."""
        kept = [entry.message for entry in entries if entry.key is not None]
        sending = set(map(id, self.not_queued(kept, "sweep: %d later() start(s)")))
        return [e for e in entries if e.key is None or id(e.message) in sending]
