"""Action definitions by actor class and name, looked up along the actor's MRO."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import UnknownAction

if TYPE_CHECKING:
    from .definition import SteppedAction

__all__ = ["Registry"]


class Registry:
    """Maps ``(actor class, action name)`` to a :class:`SteppedAction`.

    A definition without an actor class is registered on ``object`` and so serves
    every actor that has no more specific definition.
    """

    def __init__(self) -> None:
        self._definitions: dict[tuple[type, str], SteppedAction[Any]] = {}

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
        """The definition of ``name`` for ``actor_class`` (MRO), or UnknownAction."""
        for klass in actor_class.__mro__:
            found = self._definitions.get((klass, name))
            if found is not None:
                return found
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
