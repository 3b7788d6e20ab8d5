"""Action definitions by actor class and name, looked up along the actor's MRO.

As in Stepped, a name with no declared definition but a method of that name on the
actor's class is an *implicit* one-step action calling that method: its definition is
made on first lookup and cached apart from the declared ones, so a definition
declared later takes precedence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import UnknownAction

if TYPE_CHECKING:
    from .definition import SteppedAction

__all__ = ["Registry", "has_method"]

#: Makes the implicit definition of ``name`` for an actor class.
ImplicitFactory = Callable[[type, str], "SteppedAction[Any]"]


def has_method(actor_class: type, name: str) -> bool:
    """True when ``actor_class`` (or a base class, not its metaclass) defines a public
    method ``name``: an implicit action."""
    if name.startswith("_") or not any(name in vars(klass) for klass in actor_class.__mro__):
        return False
    return callable(getattr(actor_class, name, None))


class Registry:
    """Maps ``(actor class, action name)`` to a :class:`SteppedAction`.

    A definition without an actor class is registered on ``object`` and so serves
    every actor that has no more specific definition.
    """

    def __init__(self) -> None:
        self._definitions: dict[tuple[type, str], SteppedAction[Any]] = {}
        self._implicit: dict[tuple[type, str], SteppedAction[Any]] = {}
        self._make_implicit: ImplicitFactory | None = None

    def allow_implicit(self, factory: ImplicitFactory) -> None:
        """Make implicit definitions with ``factory`` (the ``Definer`` of this registry)."""
        self._make_implicit = factory

    def add(self, definition: SteppedAction[Any]) -> None:
        """Register (or replace) a definition for its actor class and name."""
        owner = definition.actor_class or object
        self._definitions[(owner, definition.action_name)] = definition

    def remove(self, definition: SteppedAction[Any]) -> None:
        """Forget a definition (when its actor class becomes known later)."""
        owner = definition.actor_class or object
        if self._definitions.get((owner, definition.action_name)) is definition:
            del self._definitions[(owner, definition.action_name)]

    def find(self, actor_class: type, name: str) -> SteppedAction[Any]:
        """The definition of ``name`` for ``actor_class`` (MRO), else the implicit one
        calling the actor's method ``name``, else UnknownAction."""
        for klass in actor_class.__mro__:
            found = self._definitions.get((klass, name))
            if found is not None:
                return found
        implicit = self._implicit.get((actor_class, name))
        if implicit is not None:
            return implicit
        if self._make_implicit is not None and has_method(actor_class, name):
            implicit = self._make_implicit(actor_class, name)
            return self._implicit.setdefault((actor_class, name), implicit)
        raise UnknownAction(f"no stepped action {name!r} for {actor_class.__name__}")

    def names(self) -> set[str]:
        """Every defined action name."""
        return {name for _, name in self._definitions}

    def has_name(self, name: str) -> bool:
        """True when some actor class defines ``name``."""
        return any(n == name for _, n in self._definitions)

    def own(self, actor_class: type, name: str) -> SteppedAction[Any] | None:
        """The definition registered on exactly ``actor_class``, if any."""
        return self._definitions.get((actor_class, name))
