"""Steps as chords: what a step sends, and where it goes.

A step with children is a chord in shape: its header is one message per child action
or wait (``stepped.start`` / ``stepped.wait``), its body is ``stepped.advance`` for the
step. The join is Stepped's own (counted in SQL, once per child, never expiring), so
the body is applied by whichever task finishes the last member, not by Celery's
result backend. See the README section "Why Stepped keeps its own chord join".

The :class:`Dispatcher` sends every job: to the innermost ``stepped.capture()``, to
the in-process eager queue under ``task_always_eager``, or to the broker.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from celery.result import AsyncResult

if TYPE_CHECKING:
    from .extension import Stepped
    from .testing import JobQueue

__all__ = ["Dispatcher", "Job", "StepChord"]

#: Internal task names (all routed to the Stepped queue).
START, RESUME, ADVANCE, WAIT, TIMEOUT, COMPLETE = (
    "stepped.start",
    "stepped.resume",
    "stepped.advance",
    "stepped.wait",
    "stepped.timeout",
    "stepped.complete",
)

_inline: contextvars.ContextVar[bool] = contextvars.ContextVar("stepped_inline", default=False)
_recovering: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "stepped_recovering", default=False
)


@dataclass
class Job:
    """One message Stepped sends.

    ``kind`` is ``action``, ``wait``, ``timeout``, ``complete``, ``job`` or ``advance``;
    ``task`` the Celery task name; ``message`` its JSON positional arguments.
    """

    kind: str
    name: str
    task: str
    message: list[Any]
    countdown: float | None = None
    display_args: list[Any] = field(default_factory=list)
    actor: list[str] | None = None
    queue: str | None = None
    task_id: str = field(default_factory=lambda: str(uuid4()))
    retries: int = 0


@dataclass
class StepChord:
    """The chord of one step: header jobs, and the body applied when all report."""

    step_id: int
    header: list[Job]

    @property
    def body(self) -> Job:
        """``stepped.advance`` for this step."""
        return Job("advance", "advance", ADVANCE, [self.step_id])


class Dispatcher:
    """Routes jobs to a capture, the eager queue or the broker."""

    def __init__(self, stepped: Stepped) -> None:
        self.stepped = stepped
        self.captures: list[JobQueue] = []
        self._eager: deque[Job] = deque()
        self._draining = False

    @staticmethod
    def inline() -> bool:
        """True while Stepped runs as a worker (a task, eager or captured job)."""
        return _inline.get()

    @staticmethod
    def recovering() -> bool:
        """True while a redelivered or retried message runs: its first run may have
        died after committing part of its work, so finished work is followed up again."""
        return _recovering.get()

    @staticmethod
    @contextmanager
    def worker_context(recovering: bool = False) -> Iterator[None]:
        """Mark the code inside as running in a worker: joins advance inline."""
        token = _inline.set(True)
        again = _recovering.set(recovering)
        try:
            yield
        finally:
            _recovering.reset(again)
            _inline.reset(token)

    @property
    def local(self) -> bool:
        """True when jobs stay in this process (capture or eager mode)."""
        return bool(self.captures) or bool(self.stepped.app.conf.task_always_eager)

    def send(self, jobs: list[Job]) -> None:
        """Send jobs in order (header of a chord, resumptions, timeouts...)."""
        if not jobs:
            return
        if self.captures:
            self.captures[-1].extend(jobs)
        elif self.stepped.app.conf.task_always_eager:
            self._send_eager(jobs)
        else:
            self._send_broker(jobs)

    def send_one(self, job: Job) -> AsyncResult:
        """Send one job and return its ``AsyncResult``."""
        self.send([job])
        return AsyncResult(job.task_id, app=self.stepped.app)

    def send_chord(self, chord: StepChord) -> None:
        """Send the header of a step's chord (the body is applied by the join)."""
        self.send(chord.header)

    def _send_broker(self, jobs: list[Job]) -> None:
        app = self.stepped.app
        with app.producer_or_acquire() as producer:
            for job in jobs:
                if job.kind == "job":
                    task = app.tasks[job.task]
                    task.apply_async(job.message, countdown=job.countdown, task_id=job.task_id)
                    continue
                app.send_task(
                    job.task,
                    args=job.message,
                    countdown=job.countdown,
                    queue=job.queue or self.stepped.queue,
                    serializer="json",
                    task_id=job.task_id,
                    producer=producer,
                )

    # -- eager mode -------------------------------------------------------------------

    def _send_eager(self, jobs: list[Job]) -> None:
        self._eager.extend(j for j in jobs if j.kind != "timeout")
        if self._draining:
            return
        self._draining = True
        try:
            while self._eager:
                self.run(self._eager.popleft())
        except BaseException:
            self._eager.clear()
            raise
        finally:
            self._draining = False

    def run(self, job: Job) -> bool:
        """Perform one job in this process; False when it changed nothing."""
        runner: Callable[[Job], bool] = self.stepped.runtime.run_job
        with self.worker_context():
            return runner(job)
