"""What Stepped tells the world about its transitions: signals, log lines, handled errors.

Transitions call :class:`Events` after they commit; it sends the documented signals
(:mod:`celery_stepped.signals`, sender: the ``Stepped`` instance) and writes one log
line per state change on the ``celery_stepped`` logger.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import signals

__all__ = ["Events", "Facts", "error_record", "logger"]

logger = logging.getLogger("celery_stepped")


def error_record(exc: BaseException, frames: int = 5) -> dict[str, Any]:
    """What a row keeps of an exception: class, message and the last traceback frames."""
    tail = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-frames)
    return {"type": type(exc).__name__, "message": str(exc), "traceback": "".join(tail)}


def _on(actor: str) -> str:
    return f" on {actor}" if actor else ""


@dataclass(frozen=True)
class Facts:
    """What a log line says about an action: ``trip on Car/1``, its previous status and
    how long it performed."""

    name: str
    actor: str
    before: str = "performing"
    started_at: datetime | None = None
    now: datetime | None = None
    superseded_by: int | None = None
    #: Whether the action is a root, its request id and Celery options, when the
    #: transition read them with the final status (None: not read, receivers look).
    root: bool | None = None
    request_id: str | None = None
    canvas: dict[str, Any] | None = None

    def text(self) -> str:
        """``name on Type/id``."""
        return f"{self.name}{_on(self.actor)}"

    def change(self, status: str) -> str:
        """``performing -> succeeded in 1.2s`` (or ``superseded by #N``)."""
        line = f"{self.before} -> {status}"
        if self.superseded_by is not None:
            line += f" by #{self.superseded_by}"
        if self.started_at is not None and self.now is not None:
            line += f" in {(self.now - self.started_at).total_seconds():.1f}s"
        return line

    def root_request(self) -> tuple[str, dict[str, Any]] | None:
        """``(request id, canvas)`` of a root started with a request id, else None."""
        if self.root and self.request_id:
            return self.request_id, self.canvas or {}
        return None


class Events:
    """Signals and log lines of one Stepped instance.

    Args:
        sender: the object signals are sent from (the ``Stepped`` instance).
        handle_exceptions: the exception classes turned into failure; read at each
            call through :attr:`handle_exceptions`, which tests may replace.
    """

    def __init__(self, sender: Any, handle_exceptions: tuple[type[BaseException], ...]) -> None:
        self.sender = sender
        self.handle_exceptions = handle_exceptions

    def action_started(self, action_id: int, name: str, actor: str = "") -> None:
        """An action went from pending to performing."""
        logger.info("action #%s %s%s: pending -> performing", action_id, name, _on(actor))
        signals.action_started.send(sender=self.sender, action_id=action_id, name=name)

    def action_completed(self, action_id: int, status: str, facts: Facts | None = None) -> None:
        """An action reached a final status (``facts``: its name, actor, start, the clock)."""
        if facts is None:
            logger.info("action #%s: -> %s", action_id, status)
        else:
            what = f" {facts.text()}" if facts.name else ""
            logger.info("action #%s%s: %s", action_id, what, facts.change(status))
        known = {} if facts is None or facts.root is None else {"root": facts.root_request()}
        signals.action_completed.send(
            sender=self.sender, action_id=action_id, status=status, **known
        )

    def nothing_to_complete(self, name: str | None, actor: list[str] | None, status: str) -> None:
        """A ``stepped.complete`` message found no performing outbound action."""
        target = "/".join(actor or []) or "?"
        logger.info(
            "stepped.complete: no performing outbound action %s on %s, %s not applied",
            name,
            target,
            status,
        )

    def short_circuited(
        self, name: str, status: str, request_id: str | None, canvas: dict[str, Any] | None
    ) -> None:
        """An action ended before it was persisted (no row, no ``action_completed``)."""
        logger.info("action %s: -> %s (not persisted)", name, status)
        signals.action_short_circuited.send(
            sender=self.sender, name=name, status=status, request_id=request_id, canvas=canvas
        )

    def step_started(self, action_id: int, index: int) -> None:
        """A step body committed (``index`` is the 0-based definition index)."""
        logger.debug("action #%s: step %s started", action_id, index + 1)
        signals.step_started.send(sender=self.sender, action_id=action_id, index=index)

    def step_completed(self, step_id: int, status: str) -> None:
        """A step closed (once per step)."""
        logger.debug("step %s: -> %s", step_id, status)
        signals.step_completed.send(sender=self.sender, step_id=step_id, status=status)

    def handled(self, exc: BaseException, **context: Any) -> bool:
        """Log and signal ``exc`` if its class is handled; True when handled."""
        if not isinstance(exc, tuple(self.handle_exceptions)):
            return False
        logger.error(
            "stepped handled %s in %s (action %s, step %s): %s",
            type(exc).__name__,
            context.get("block"),
            context.get("action_id"),
            context.get("step_index"),
            exc,
            exc_info=exc,
        )
        signals.exception_handled.send(sender=self.sender, exception=exc, **context)
        return True

    def report_or_raise(
        self, exc: BaseException, action_id: int | None, index: int | None, block: str
    ) -> None:
        """Turn a handled exception into failure (the caller records it); re-raise others."""
        if not self.handled(exc, action_id=action_id, step_index=index, block=block):
            raise exc
