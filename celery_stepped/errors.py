"""The exceptions of celery_stepped: one root, one class per failure kind."""

from __future__ import annotations


class SteppedError(Exception):
    """Base class of every error raised by celery_stepped."""


class ConfigurationError(SteppedError):
    """A required setting is missing or contradicts another one."""


class UnknownAction(SteppedError, LookupError):
    """No action definition exists for that name and actor."""


class Deadlock(SteppedError):
    """An action tried to join the lane whose current action is one of its ancestors."""


class ActorNotFound(SteppedError, LookupError):
    """An actor reference could not be loaded (deleted row or unknown type)."""


class ActionNotFound(SteppedError, LookupError):
    """No action row exists with that id."""


class ActionFailed(SteppedError):
    """A root action tracked by an ``AsyncResult`` ended in a status other than succeeded.

    ``status`` is its final status, ``action_id`` its id (None when it never persisted).
    """

    def __init__(self, status: str, action_id: int | None = None) -> None:
        super().__init__(status, action_id)
        self.status = status
        self.action_id = action_id

    def __str__(self) -> str:
        return f"action {self.action_id} ended {self.status}"
