"""What a transition that reads actors and lanes is built with."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from .actors import ActorRegistry
from .events import Events
from .lanes import Lanes

if TYPE_CHECKING:
    from .definition import SteppedAction

__all__ = ["Lookup", "Transition"]

#: ``lookup(actor_type, name)``: the definition of an action.
Lookup = Callable[[str, str], "SteppedAction[Any]"]


class Transition:
    """A transition's collaborators: sessions, actors, lanes, definitions, events, clock."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        actors: ActorRegistry,
        lanes: Lanes,
        lookup: Lookup,
        events: Events,
        clock: Callable[[], datetime],
    ) -> None:
        self.session_factory = session_factory
        self.actors = actors
        self.lanes = lanes
        self.lookup = lookup
        self.events = events
        self.clock = clock
