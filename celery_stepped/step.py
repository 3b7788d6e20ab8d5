"""The ``step`` a step body receives: it records what the body asks for.

``step.do`` / ``step.on`` / ``step.wait`` only record intents; the performing
transition writes them as the step's join members in the body's transaction, and the
engine sends them after the commit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from sqlalchemy.orm import Session

from .child_rows import child_row
from .members import task_call
from .statuses import LinkKind, StepStatus

if TYPE_CHECKING:
    from .action_keys import Definition
    from .models import Action

__all__ = ["Intent", "Step"]


@dataclass
class Intent:
    """What a step body asked for: a child action, a wait, or the action's own job."""

    kind: str
    call: dict[str, Any] = field(default_factory=dict)
    #: A child's pending row, which its parent step writes when the body has returned
    #: (:mod:`~celery_stepped.child_rows`; None from it: the child's start writes it).
    row: Callable[[], dict[str, Any] | None] | None = field(default=None, repr=False)

    @property
    def is_member(self) -> bool:
        """True when the step's join waits on it (a child action or a wait)."""
        return self.kind in (LinkKind.ACTION, LinkKind.WAIT, LinkKind.TASK)


class Step:
    """The running step: ``do``, ``on``, ``wait``, ``status``, ``action``, ``session``.

    Args:
        session: the session of the step's transaction (the actor is attached to it).
        action: the running action.
        actor: the actor, loaded in ``session``.
        dump: turns arguments into JSON with actors as references.
        identify: ``(type name, identity)`` of an actor.
        check: the definition of ``(actor class, name)``; raises ``UnknownAction`` when
            there is none.
    """

    def __init__(
        self,
        session: Session,
        action: Action,
        actor: Any,
        dump: Callable[[Any], Any],
        identify: Callable[[Any], tuple[str, str]],
        check: Callable[[type, str], Definition],
    ) -> None:
        self.session = session
        self.action = action
        self.actor = actor
        self.status: str = StepStatus.PERFORMING.value
        self.intents: list[Intent] = []
        self._dump = dump
        self._identify = identify
        self._check = check

    def do(self, action: Any, *args: Any) -> None:
        """Run another action on the same actor; the step waits for it."""
        self.on(self.actor, action, *args)

    def on(self, actors: Any, action: Any, *args: Any) -> None:
        """Run an action on one actor or a list of them (``None`` entries ignored)."""
        name = getattr(action, "action_name", action)
        if not isinstance(name, str):
            raise TypeError("step.on() takes a SteppedAction or an action name")
        targets = actors if isinstance(actors, list | tuple) else [actors]
        dumped = self._dump(list(args))
        for target in targets:
            if target is None:
                continue
            definition = self._check(type(target), name)
            ref = list(self._identify(target))
            # The request id its start message carries: ``before`` runs once per start.
            call = {"actor": ref, "name": name, "args": dumped, "request": str(uuid4())}
            row = partial(child_row, definition, target, list(args), call)
            self.intents.append(Intent(LinkKind.ACTION, call, row))

    def wait(self, duration: float | int | timedelta) -> None:
        """A timed wait the step depends on."""
        seconds = duration.total_seconds() if isinstance(duration, timedelta) else duration
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
            raise TypeError("step.wait() takes non-negative seconds or a timedelta")
        self.intents.append(Intent(LinkKind.WAIT, {"seconds": float(seconds)}))

    def task(self, signature: Any, timeout: float | int | timedelta | None = None) -> None:
        """A plain Celery signature as a member of the step's join (``send.s(1)``): it
        succeeds when the task returns and fails when it raises, is revoked, expires or
        outlives ``timeout`` seconds (then ``timed_out``)."""
        self.intents.append(Intent(LinkKind.TASK, task_call(signature, timeout)))

    def enqueue_job(self) -> None:
        """Enqueue the action's Celery job (the generated step of a job-backed action)."""
        self.intents.append(Intent("job"))

    @property
    def members(self) -> list[Intent]:
        """The intents the step's join waits on."""
        return [intent for intent in self.intents if intent.is_member]
