"""celery_stepped: workflows as a persisted tree of actions, natively on Celery.

See API.md for the contract; the public names are exported here. They are imported
on first use (a module ``__getattr__``): every ``celery`` command imports this package
through the ``celery.commands`` entry point, and should not pay for SQLAlchemy, Redis
and the engine unless it uses them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .canvas import SteppedSignature
    from .definition import SteppedAction
    from .errors import (
        ActionFailed,
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
    from .step import Step as StepContext

__all__ = [
    "ActionFailed",
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

_MODULES = {
    "ActionFailed": ".errors",
    "ActionNotFound": ".errors",
    "ActionStatus": ".statuses",
    "ActorNotFound": ".errors",
    "ConfigurationError": ".errors",
    "Deadlock": ".errors",
    "Lane": ".lanes",
    "Step": ".step",
    "StepContext": ".step",
    "StepStatus": ".statuses",
    "Stepped": ".extension",
    "SteppedAction": ".definition",
    "SteppedError": ".errors",
    "SteppedSignature": ".canvas",
    "UnknownAction": ".errors",
}
#: ``StepContext`` is the former name of ``Step``.
_ALIASES = {"StepContext": "Step"}


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (then it is a plain global)."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
