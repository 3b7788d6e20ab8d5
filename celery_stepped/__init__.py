"""celery_stepped: workflows as a persisted tree of actions, natively on Celery.

See API.md for the contract; the public names are exported here.
"""

from __future__ import annotations

from .canvas import SteppedSignature
from .definition import SteppedAction
from .errors import (
    ActionNotFound,
    ActorNotFound,
    ConfigurationError,
    Deadlock,
    SteppedError,
    UnknownAction,
)
from .extension import Stepped
from .lanes import Lane
from .statuses import ActionStatus, StepStatus
from .step import Step

#: The former name of :class:`Step`.
StepContext = Step

__all__ = [
    "ActionNotFound",
    "ActionStatus",
    "ActorNotFound",
    "ConfigurationError",
    "Deadlock",
    "Lane",
    "Step",
    "StepContext",
    "StepStatus",
    "Stepped",
    "SteppedAction",
    "SteppedError",
    "SteppedSignature",
    "UnknownAction",
]

__version__ = "0.1.0"
