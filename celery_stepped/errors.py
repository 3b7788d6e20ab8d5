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
