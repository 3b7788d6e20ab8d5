"""Testing helpers: eager mode, ``stepped.capture()``, ``perform_stepped_actions``.

Capture and eager modes are outboxes (:mod:`celery_stepped.outbox`) that keep
messages in this process; they run Stepped's own queue, not Celery's eager emulation,
so trees of any depth run without recursion. The core never imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from .messages import Message, MessageKind
from .models import Action
from .outbox import EnqueuedJob, JobQueue
from .statuses import ActionStatus
from .step_index import ran_every_step

if TYPE_CHECKING:
    from .extension import Stepped

__all__ = [
    "EnqueuedJob",
    "JobQueue",
    "assert_no_stepped_actions",
    "assert_stepped_action_job",
    "capture",
    "handle_stepped_action_exceptions",
    "perform_stepped_actions",
]


def capture(stepped: Stepped) -> AbstractContextManager[JobQueue]:
    """``stepped.capture()``: the innermost capture receives every new job."""
    return stepped.capture()


def _ready_outbound(stepped: Stepped) -> list[Action]:
    ready = []
    with stepped.session_factory() as session:
        rows = session.scalars(
            select(Action).where(
                Action.status == ActionStatus.PERFORMING.value, Action.outbound.is_(True)
            )
        ).all()
        for action in rows:
            count = len(stepped.definition_for(action.actor_type, action.name).steps_for_run())
            if ran_every_step(session, action.id, action.current_step_index, count):
                ready.append(action)
        session.expunge_all()
    for action in ready:
        action._load_actor = stepped.actors.load_ref
    return ready


def perform_stepped_actions(
    stepped: Stepped, complete_outbound: Callable[[Action], str | None] | None = None
) -> int:
    """Drain the innermost capture, waits and timeouts included, regardless of delay.

    After each drain, ``complete_outbound(action)`` is called for every performing
    outbound action whose steps all finished; a status it returns completes the
    action. Stops when a round changes nothing. Returns how many jobs ran.
    """
    if not stepped.outboxes.captures:
        raise RuntimeError("perform_stepped_actions needs an active stepped.capture()")
    queue = stepped.outboxes.captures[-1]
    total = 0
    while True:
        total += queue.perform_all()
        completed = 0
        if complete_outbound is not None:
            for action in _ready_outbound(stepped):
                status = complete_outbound(action)
                if status and stepped.complete(action.id, status) is not None:
                    completed += 1
        if not completed:
            return total


@contextmanager
def handle_stepped_action_exceptions(
    stepped: Stepped, only: Iterable[type[BaseException]] = (Exception,)
) -> Iterator[None]:
    """Treat the ``only`` exception classes as handled inside the block."""
    previous = stepped.handle_exceptions
    stepped.handle_exceptions = tuple(only)
    try:
        yield
    finally:
        stepped.handle_exceptions = previous


def _new(jobs: JobQueue, before: list[Message]) -> list[Message]:
    seen = {id(m) for m in before}
    return [m for m in jobs.messages if id(m) not in seen]


@contextmanager
def assert_stepped_action_job(jobs: JobQueue, name: str, actor: Any = None) -> Iterator[None]:
    """Assert that the block enqueues an ``action`` job ``name`` (on ``actor``)."""
    before = list(jobs.messages)
    yield
    wanted = None if actor is None else list(jobs.identify(actor))
    made = _new(jobs, before)
    for message in made:
        ours = wanted is None or message.actor == wanted
        if message.kind is MessageKind.ACTION and message.name == name and ours:
            return
    target = "" if wanted is None else f" on {'/'.join(wanted)}"
    kinds = [(m.kind.value, m.name) for m in made]
    raise AssertionError(f"expected a stepped action job {name!r}{target}; enqueued {kinds}")


@contextmanager
def assert_no_stepped_actions(jobs: JobQueue) -> Iterator[None]:
    """Assert that the block enqueues no job at all."""
    before = list(jobs.messages)
    yield
    made = [(m.kind.value, m.name) for m in _new(jobs, before)]
    if made:
        raise AssertionError(f"expected no stepped jobs; enqueued {made}")
