"""Testing helpers: eager mode, ``stepped.capture()``, ``perform_stepped_actions``.

Capture and eager modes run Stepped's own in-process queue, not Celery's eager
emulation: jobs run breadth-first from one queue, so trees of any depth run without
recursion.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery.exceptions import Retry
from sqlalchemy import select

from .canvas import Job
from .models import Action
from .statuses import ActionStatus

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

KINDS = ("action", "wait", "timeout", "complete", "job")


@dataclass(frozen=True)
class EnqueuedJob:
    """A job held by a capture: ``kind``, ``name`` (action or task name), ``args``."""

    kind: str
    name: str
    args: list[Any]
    actor: tuple[str, str] | None = field(default=None, compare=False)


def _kinds(only: str | Iterable[str] | None) -> set[str] | None:
    if only is None:
        return None
    kinds = {only} if isinstance(only, str) else set(only)
    unknown = kinds - set(KINDS) - {"advance"}
    if unknown:
        raise ValueError(f"unknown job kind(s) {sorted(unknown)}; kinds are {KINDS}")
    return kinds


class JobQueue:
    """Jobs Stepped would have sent, held in this process until performed."""

    def __init__(self, stepped: Stepped) -> None:
        self.stepped = stepped
        self._jobs: list[Job] = []

    def extend(self, jobs: Iterable[Job]) -> None:
        """Hold more jobs (called by the dispatcher)."""
        self._jobs.extend(jobs)

    @property
    def enqueued(self) -> list[EnqueuedJob]:
        """The jobs still pending, oldest first."""
        return [
            EnqueuedJob(j.kind, j.name, list(j.display_args), tuple(j.actor) if j.actor else None)  # type: ignore[arg-type]
            for j in self._jobs
        ]

    def __len__(self) -> int:
        return len(self._jobs)

    def _take(self, only: str | Iterable[str] | None) -> list[Job]:
        kinds = _kinds(only)
        taken = [j for j in self._jobs if kinds is None or j.kind in kinds]
        self._jobs = [j for j in self._jobs if not (kinds is None or j.kind in kinds)]
        return taken

    def _perform(self, only: str | Iterable[str] | None) -> tuple[int, bool]:
        batch = self._take(only)
        progressed = False
        for job in batch:
            progressed = self.stepped.dispatcher.run(job) or progressed
        return len(batch), progressed

    def perform(self, only: str | Iterable[str] | None = None) -> int:
        """Perform the jobs enqueued before this call; return how many ran."""
        return self._perform(only)[0]

    def perform_all(self, only: str | Iterable[str] | None = None) -> int:
        """Repeat :meth:`perform` until nothing is left; return how many ran.

        A timeout whose deadline has not passed by ``stepped.clock`` goes back in the
        queue; a round that only re-queued such timeouts ends the loop.
        """
        total = 0
        while True:
            count, progressed = self._perform(only)
            total += count
            if count == 0 or not progressed:
                return total


@contextmanager
def capture(stepped: Stepped) -> Iterator[JobQueue]:
    """``stepped.capture()``: the innermost capture receives every new job."""
    queue = JobQueue(stepped)
    dispatcher = stepped.dispatcher
    dispatcher.captures.append(queue)
    try:
        yield queue
    finally:
        dispatcher.captures.remove(queue)
        leftover = queue._take(None)
        if leftover:
            dispatcher.send(leftover)


def _ready_outbound(stepped: Stepped) -> list[Action]:
    with stepped.session_factory() as session:
        rows = session.scalars(
            select(Action).where(
                Action.status == ActionStatus.PERFORMING.value, Action.outbound.is_(True)
            )
        ).all()
        session.expunge_all()
    ready = []
    for action in rows:
        definition = stepped.runtime.definition_for(action.actor_type, action.name)
        if action.current_step_index >= len(definition.steps_for_run()):
            action._stepped = stepped
            ready.append(action)
    return ready


def perform_stepped_actions(
    stepped: Stepped, complete_outbound: Callable[[Action], str | None] | None = None
) -> int:
    """Drain the innermost capture, waits and timeouts included, regardless of delay.

    After each drain, ``complete_outbound(action)`` is called for every performing
    outbound action whose steps all finished; a status it returns completes the
    action. Stops when a round changes nothing. Returns how many jobs ran.
    """
    if not stepped.dispatcher.captures:
        raise RuntimeError("perform_stepped_actions needs an active stepped.capture()")
    queue = stepped.dispatcher.captures[-1]
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


def _new_jobs(jobs: JobQueue, before: list[Job]) -> list[Job]:
    seen = {id(j) for j in before}
    return [j for j in jobs._jobs if id(j) not in seen]


@contextmanager
def assert_stepped_action_job(jobs: JobQueue, name: str, actor: Any = None) -> Iterator[None]:
    """Assert that the block enqueues an ``action`` job ``name`` (on ``actor``)."""
    before = list(jobs._jobs)
    yield
    wanted = None if actor is None else list(jobs.stepped.actors.identify(actor))
    for job in _new_jobs(jobs, before):
        if job.kind == "action" and job.name == name and (wanted is None or job.actor == wanted):
            return
    made = [(j.kind, j.name) for j in _new_jobs(jobs, before)]
    target = "" if wanted is None else f" on {'/'.join(wanted)}"
    raise AssertionError(f"expected a stepped action job {name!r}{target}; enqueued {made}")


@contextmanager
def assert_no_stepped_actions(jobs: JobQueue) -> Iterator[None]:
    """Assert that the block enqueues no job at all."""
    before = list(jobs._jobs)
    yield
    made = [(j.kind, j.name) for j in _new_jobs(jobs, before)]
    if made:
        raise AssertionError(f"expected no stepped jobs; enqueued {made}")


def run_user_job(stepped: Stepped, job: Job) -> bool:
    """Run a job-backed action's task through Celery's eager tracer.

    A ``self.retry()`` in the task puts the job back in the queue (kind ``"job"``)
    instead of running it again inline.
    """
    from celery.app.trace import build_tracer

    task = stepped.app.tasks[job.task]
    tracer = build_tracer(task.name, task, eager=True, propagate=True, app=stepped.app)
    request = {
        "id": job.task_id,
        "retries": job.retries,
        "is_eager": True,
        "logfile": None,
        "loglevel": 0,
        "hostname": socket.gethostname(),
        "callbacks": None,
        "errbacks": None,
        "headers": None,
        "ignore_result": False,
        "args": job.message,
        "kwargs": {},
        "delivery_info": {
            "is_eager": True,
            "exchange": None,
            "routing_key": None,
            "priority": None,
        },
    }
    try:
        tracer(job.task_id, job.message, {}, request)
    except Retry:
        again = Job(
            job.kind,
            job.name,
            job.task,
            job.message,
            job.countdown,
            job.display_args,
            job.actor,
            job.queue,
            retries=job.retries + 1,
        )
        stepped.dispatcher.send([again])
    return True
