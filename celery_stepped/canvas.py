"""Stepped actions in Celery's canvas: :class:`SteppedSignature`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery.canvas import Signature

if TYPE_CHECKING:
    from celery.result import AsyncResult

    from .models import Action

__all__ = ["SteppedSignature"]


class SteppedSignature(Signature):
    """A Celery signature of a stepped action: ``drive.s(car, 5).later()``."""

    def later(self, **options: Any) -> AsyncResult:
        """Enqueue the start of the root action this signature describes."""
        action = self.type
        return action.later(*self.args, **options)

    def now(self) -> Action:
        """Run the action's synchronous part in this process."""
        action = self.type
        return action.now(*self.args)
