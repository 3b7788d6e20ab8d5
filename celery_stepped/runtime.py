"""The state machine: start, perform a step, join, advance, complete.

Every transition is a short SQL transaction guarded by the row's current state
(``UPDATE ... WHERE status = ...``), so a message delivered twice, or two workers
finishing the last two children of a step at once, apply it exactly once. Messages
are sent only after the transaction that decided them committed.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast
from uuid import uuid4

from celery.result import AsyncResult
from sqlalchemy import delete, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from . import signals
from .canvas import ADVANCE, COMPLETE, RESUME, START, TIMEOUT, WAIT, Job, StepChord
from .errors import Deadlock
from .models import Achievement, Action, ParentLink, Step
from .statuses import COMPLETION_STATUSES, ActionStatus, StepStatus

if TYPE_CHECKING:
    from .definition import SteppedAction
    from .extension import Stepped

__all__ = ["Runtime", "StepContext"]

PENDING, PERFORMING = ActionStatus.PENDING.value, ActionStatus.PERFORMING.value
OPEN = (PENDING, PERFORMING)


def _changed(session: Session, statement: Any) -> int:
    """Execute an UPDATE/DELETE and return how many rows it changed."""
    result = cast(CursorResult[Any], session.execute(statement))
    return int(result.rowcount)


def checksum_digest(value: Any) -> str:
    """SHA-256 hex digest of the canonical JSON of ``value``."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def key_from_parts(value: Any) -> str | None:
    """A key from a string or a list/tuple of parts joined with ``/``; None if empty."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        value = "/".join(str(v) for v in value)
    text = str(value)
    return text or None


def timeout_seconds(spec: Any, actor: Any) -> float | None:
    """Seconds from a timeout option: number, timedelta or callable(actor)."""
    if spec is None:
        return None
    if callable(spec) and not isinstance(spec, timedelta):
        spec = spec(actor)
    if spec is None:
        return None
    if isinstance(spec, timedelta):
        return spec.total_seconds()
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return float(spec)
    raise TypeError(f"timeout must give seconds or a timedelta, got {spec!r}")


class Intent:
    """What a step body asked for: a child action, a wait or the job of the action."""

    def __init__(self, kind: str, call: dict[str, Any] | None = None, seconds: float = 0) -> None:
        self.kind = kind
        self.call = call
        self.seconds = seconds


class StepContext:
    """The ``step`` a body receives: ``do``, ``on``, ``wait``, ``status``, ``action``."""

    def __init__(self, stepped: Stepped, session: Session, action: Action, actor: Any) -> None:
        self._stepped = stepped
        self.session = session
        self.action = action
        self.actor = actor
        self.status: str = StepStatus.PERFORMING.value
        self.intents: list[Intent] = []

    def do(self, action: Any, *args: Any) -> None:
        """Run another action on the same actor; the step waits for it."""
        self.on(self.actor, action, *args)

    def on(self, actors: Any, action: Any, *args: Any) -> None:
        """Run an action on one actor or a list of them (``None`` entries ignored)."""
        name = getattr(action, "action_name", action)
        if not isinstance(name, str):
            raise TypeError("step.on() takes a SteppedAction or an action name")
        targets = actors if isinstance(actors, list | tuple) else [actors]
        dumped = self._stepped.actors.dump(list(args))
        for target in targets:
            if target is None:
                continue
            self._stepped.registry.find(type(target), name)
            ref = list(self._stepped.actors.identify(target))
            self.intents.append(Intent("action", {"actor": ref, "name": name, "args": dumped}))

    def wait(self, duration: float | int | timedelta) -> None:
        """A timed wait the step depends on."""
        seconds = duration.total_seconds() if isinstance(duration, timedelta) else duration
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
            raise TypeError("step.wait() takes non-negative seconds or a timedelta")
        self.intents.append(Intent("wait", seconds=float(seconds)))

    def enqueue_job(self) -> None:
        """Enqueue the action's Celery job (the generated step of a job-backed action)."""
        self.intents.append(Intent("job"))


@dataclass
class StartCall:
    """Everything needed to start an action, as it travels in a ``stepped.start`` message."""

    actor: list[str]
    name: str
    args: list[Any]
    link: int | None = None
    request: str | None = None

    def message(self) -> list[Any]:
        """The positional arguments of the ``stepped.start`` message."""
        return [
            {
                "actor": self.actor,
                "name": self.name,
                "args": self.args,
                "link": self.link,
                "request": self.request,
            }
        ]

    @classmethod
    def from_message(cls, payload: dict[str, Any]) -> StartCall:
        """Rebuild the call from a ``stepped.start`` payload."""
        return cls(
            payload["actor"],
            payload["name"],
            list(payload.get("args") or []),
            payload.get("link"),
            payload.get("request"),
        )


class _ShortCircuit(Exception):
    def __init__(self, status: str) -> None:
        self.status = status


class Runtime:
    """Runs actions for one :class:`~celery_stepped.Stepped` instance."""

    def __init__(self, stepped: Stepped) -> None:
        self.stepped = stepped

    # -- helpers ------------------------------------------------------------------------

    @property
    def now(self) -> Callable[[], Any]:
        """The Stepped clock."""
        return self.stepped.clock

    def _session(self) -> Session:
        return self.stepped.session_factory()

    def _send(self, jobs: list[Job]) -> None:
        self.stepped.dispatcher.send(jobs)

    def definition_for(self, actor_type: str, name: str) -> SteppedAction[Any]:
        """The definition of ``name`` for the actor type called ``actor_type``."""
        cls = self.stepped.actors.resolve(actor_type).cls
        return self.stepped.registry.find(cls, name)

    def handoff(self, step_ids: Iterable[int]) -> None:
        """Advance steps whose last member reported: inline in a worker, else a task."""
        ids = [s for s in step_ids if s is not None]
        if not ids:
            return
        dispatcher = self.stepped.dispatcher
        if dispatcher.inline() or dispatcher.local:
            self._drain(ids)
        else:
            self._send([StepChord(s, []).body for s in ids])

    def _recovering(self) -> bool:
        """True while a redelivered or retried message runs (see ``Dispatcher``)."""
        return self.stepped.dispatcher.recovering()

    def _drain(self, step_ids: Sequence[int]) -> None:
        queue = deque(step_ids)
        while queue:
            queue.extend(self.advance_step(queue.popleft()))

    # -- starting ---------------------------------------------------------------------

    def start_now(self, name: str, actor: Any, args: list[Any]) -> Action:
        """``SteppedAction.now``: start a root action in this process."""
        call = self._root_call(name, actor, args)
        action = self.start(call, root=True)
        if action.id is None:
            return action
        return self.stepped.get_action(action.id)

    def start_later(self, name: str, actor: Any, args: list[Any]) -> AsyncResult:
        """``SteppedAction.later``: enqueue the start of a root action."""
        call = self._root_call(name, actor, args)
        call.request = str(uuid4())
        definition = self.definition_for(call.actor[0], name)
        job = Job(
            "action",
            name,
            START,
            call.message(),
            display_args=call.args,
            actor=call.actor,
            queue=definition.resolved("action_queue"),
            task_id=call.request,
        )
        return self.stepped.dispatcher.send_one(job)

    def _root_call(self, name: str, actor: Any, args: list[Any]) -> StartCall:
        if actor is None:
            raise TypeError(f"{name} needs an actor")
        self.stepped.registry.find(type(actor), name)
        dumped = self.stepped.actors.dump(list(args))
        return StartCall(list(self.stepped.actors.identify(actor)), name, dumped)

    def start(self, call: StartCall, root: bool = False) -> Action:
        """Start an action: before, keys, reuse, lane. Returns it (maybe not persisted)."""
        existing = self._existing_for(call)
        if existing is not None:
            self._resume_existing(existing)
            if existing == -1 and call.link is not None:
                self.handoff(self._follow_link(call.link))
            return self._detached(existing)
        definition = self.definition_for(call.actor[0], call.name)
        try:
            action = self._prepare(definition, call, root)
        except _ShortCircuit as short:
            transient = self._transient(definition, call, root, short.status)
            self._finish_call_link(call, short.status)
            return transient
        if action.checksum is not None:
            shared = self._share(action, call)
            if shared is not None:
                return shared
        created = self._create(action, call)
        if created is None:  # another delivery claimed the link first
            return self.start(call, root)
        return self._join(created, definition)

    def _existing_for(self, call: StartCall) -> int | None:
        with self._session() as s:
            if call.link is not None:
                link = s.get(ParentLink, call.link)
                if link is None:
                    raise LookupError(f"unknown parent link {call.link}")
                if link.state != "waiting" and link.action_id is None:
                    return -1
                return link.action_id
            if call.request is not None:
                return s.scalar(select(Action.id).where(Action.request_id == call.request))
        return None

    def _resume_existing(self, action_id: int) -> None:
        """A redelivered start: carry on from whatever the action's records say."""
        if action_id == -1:
            return
        with self._session() as s:
            action = s.get(Action, action_id)
            if action is None:
                return
            status = action.status
            s.expunge(action)
        action._stepped = self.stepped
        if status == PENDING:
            self._join(action)
        elif status == PERFORMING:
            self.handoff(self.run_steps(action_id))
        else:
            self.handoff(self.completion_effects(action_id))

    def _transient(
        self, definition: SteppedAction[Any], call: StartCall, root: bool, status: str
    ) -> Action:
        action = Action(
            name=call.name,
            actor_type=call.actor[0],
            actor_id=call.actor[1],
            arguments=call.args,
            status=status,
            root=root,
            outbound=definition.outbound,
            concurrency_key=_tenancy(call),
            checksum_key=_tenancy(call),
        )
        action._stepped = self.stepped
        if ActionStatus(status).is_final:
            action.completed_at = self.now()
        return action

    def _detached(self, action_id: int) -> Action:
        if action_id == -1:
            return Action(name="", actor_type="", actor_id="", status="succeeded")
        return self.stepped.get_action(action_id)

    def _prepare(self, definition: SteppedAction[Any], call: StartCall, root: bool) -> Action:
        """Run ``before`` and the key/checksum blocks; raise _ShortCircuit to stop."""
        with self._session() as s:
            actor = self.stepped.actors.load_ref(call.actor[0], call.actor[1], s)
            args = self.stepped.actors.load(call.args, s)
            action = self._transient(definition, call, root, PENDING)
            action.arguments = args
            for hook in definition.before_hooks():
                try:
                    hook(action, actor, *action.arguments)
                except Exception as exc:
                    s.rollback()
                    self._report_or_raise(exc, None, None, "before")
                    raise _ShortCircuit(ActionStatus.FAILED.value) from exc
                if action._short_circuit is not None:
                    break
            s.commit()
            if action._short_circuit is not None:
                raise _ShortCircuit(action._short_circuit)
            loaded = list(action.arguments)
            call.args = action.arguments = self.stepped.actors.dump(loaded)
            try:
                self._compute_keys(definition, action, actor, loaded)
            except Exception as exc:
                s.rollback()
                self._report_or_raise(exc, None, None, "keys")
                raise _ShortCircuit(ActionStatus.FAILED.value) from exc
            if action.checksum is not None and action.checksum == s.scalar(
                select(Achievement.checksum).where(Achievement.checksum_key == action.checksum_key)
            ):
                raise _ShortCircuit(ActionStatus.SUCCEEDED.value)
        return action

    def _compute_keys(
        self, definition: SteppedAction[Any], action: Action, actor: Any, args: list[Any]
    ) -> None:
        tenancy = action.concurrency_key
        for attribute, spec_name in (
            ("concurrency_key", "concurrency_key_spec"),
            ("checksum_key", "checksum_key_spec"),
        ):
            spec = definition.resolved(spec_name)
            value = spec(actor, *args) if callable(spec) else spec
            setattr(action, attribute, key_from_parts(value) or tenancy)
        checksum_fn = definition.resolved("checksum_fn")
        if checksum_fn is not None:
            value = checksum_fn(actor, *args)
            action.checksum = None if value is None else checksum_digest(value)
        action.timeout_seconds = timeout_seconds(definition.resolved("timeout_spec"), actor)
        job = definition.resolved("job")
        action.job = None if job is None else str(job.name)

    def _share(self, action: Action, call: StartCall) -> Action | None:
        """Attach to an identical checksum already performing in the lane."""
        current, checksum = self.stepped.lanes.current_checksum(action.concurrency_key)
        if current is None or checksum != action.checksum:
            return None
        with self._session() as s:
            if call.link is not None and f",{current}," in self._ancestry(s, call.link):
                return None  # attaching to an ancestor would wait forever: join, deadlock
            locked = _changed(
                s,
                update(Action)
                .where(
                    Action.id == current,
                    Action.status == PERFORMING,
                    Action.checksum == action.checksum,
                )
                .values(updated_at=self.now()),
            )
            if not locked:
                return None
            if call.link is not None:
                claimed = _changed(
                    s,
                    update(ParentLink)
                    .where(
                        ParentLink.id == call.link,
                        ParentLink.action_id.is_(None),
                        ParentLink.state == "waiting",
                    )
                    .values(action_id=current),
                )
                if not claimed:
                    s.rollback()
                    return self._detached(self._existing_for(call) or -1)
            s.commit()
        return self.stepped.get_action(current)

    def _create(self, action: Action, call: StartCall) -> Action | None:
        with self._session() as s:
            if call.link is not None:
                action.ancestry = self._ancestry(s, call.link)
            action.request_id = call.request
            action.created_at = action.updated_at = self.now()
            s.add(action)
            try:
                s.flush()
            except IntegrityError:
                s.rollback()
                return None
            if call.link is not None:
                claimed = _changed(
                    s,
                    update(ParentLink)
                    .where(
                        ParentLink.id == call.link,
                        ParentLink.action_id.is_(None),
                        ParentLink.state == "waiting",
                    )
                    .values(action_id=action.id),
                )
                if not claimed:
                    s.rollback()
                    return None
            s.commit()
            s.expunge(action)
        action._stepped = self.stepped
        return action

    @staticmethod
    def _ancestry(s: Session, link_id: int) -> str:
        """Ancestry of a child started through ``link_id``: one query at any depth."""
        parent = s.execute(
            select(Action.id, Action.ancestry)
            .join(Step, Step.action_id == Action.id)
            .join(ParentLink, ParentLink.step_id == Step.id)
            .where(ParentLink.id == link_id)
        ).one()
        return f"{parent.ancestry}{parent.id},"

    def _join(self, action: Action, definition: SteppedAction[Any] | None = None) -> Action:
        """Enter the action's lane: perform, wait (superseding older ones) or deadlock.

        Older pending actions are superseded in SQL before they leave the lane in
        Redis (``Lanes.enter``), so a crash in between loses none of them.
        """
        superseded: list[int] = []
        zeros: list[int] = []

        def supersede(old_ids: list[int]) -> None:  # under the lane lock: SQL only
            done, stuck = self._supersede_rows(old_ids, action.id)
            superseded.extend(done)
            zeros.extend(stuck)

        result = self.stepped.lanes.enter(
            action.concurrency_key, action.id, action.checksum, action.ancestry, supersede
        )
        self._after_supersede(superseded, zeros, action.id)
        if result.outcome == "deadlock":
            self._deadlock(action, result.current_id)
        elif result.outcome == "perform":
            self.perform(action.id)
        return action

    def _deadlock(self, action: Action, current_id: int | None) -> None:
        with self._session() as s:
            s.execute(
                update(Action)
                .where(Action.id == action.id, Action.status == PENDING)
                .values(status=ActionStatus.DEADLOCKED.value, completed_at=self.now())
            )
            s.commit()
        action.status = ActionStatus.DEADLOCKED.value
        self.handoff(self.completion_effects(action.id))
        error = Deadlock(
            f"{action.name} on {action.actor_type}/{action.actor_id} would wait for its "
            f"ancestor {current_id} in lane {action.concurrency_key!r}"
        )
        self._report_or_raise(error, action.id, None, "lane")

    def _finish_call_link(self, call: StartCall, status: str) -> None:
        """A child that never persisted reports its outcome to the parent step."""
        if call.link is None:
            return
        with self._session() as s:
            zero = self._finish_link(s, call.link, status, status == "succeeded")
            s.commit()
        self.handoff([zero] if zero else [])

    # -- superseding ------------------------------------------------------------------

    def supersede(self, old_ids: list[int], newcomer_id: int) -> None:
        """Mark pending actions superseded and move their waiting parents to the newcomer."""
        self._after_supersede(*self._supersede_rows(old_ids, newcomer_id), newcomer_id)

    def _supersede_rows(self, old_ids: list[int], newcomer_id: int) -> tuple[list[int], list[int]]:
        """Superseding in one SQL transaction; returns (superseded ids, steps at zero)."""
        zeros: list[int] = []
        superseded: list[int] = []
        if not old_ids:
            return superseded, zeros
        with self._session() as s:
            for old in old_ids:
                done = _changed(
                    s,
                    update(Action)
                    .where(Action.id == old, Action.status == PENDING)
                    .values(
                        status=ActionStatus.SUPERSEDED.value,
                        completed_at=self.now(),
                        superseded_by_id=newcomer_id,
                    ),
                )
                if done:
                    superseded.append(old)
                    zeros.extend(self._transfer_links(s, old, newcomer_id))
            s.commit()
        return superseded, zeros

    def _after_supersede(self, superseded: list[int], zeros: list[int], newcomer_id: int) -> None:
        """Signals and follow-ups of superseding (run outside the lane lock)."""
        if not superseded:
            self.handoff(zeros)
            return
        for old in superseded:
            signals.action_completed.send(
                sender=self.stepped, action_id=old, status=ActionStatus.SUPERSEDED.value
            )
        with self._session() as s:
            newcomer_final = s.scalar(select(Action.status).where(Action.id == newcomer_id))
        if newcomer_final not in OPEN:  # it completed before the links arrived
            zeros.extend(self.completion_effects(newcomer_id))
        self.handoff(zeros)

    def _transfer_links(self, s: Session, old: int, newcomer: int) -> list[int]:
        """Make ``old``'s waiting parent steps wait on ``newcomer``; a few statements at any count.

        The step that started ``old`` keeps that link as its record (``transferred``) and
        gains a copy waiting on the newcomer; links already carried over from earlier
        superseded actions move in place (one statement), so a lane superseded n times
        with n parents holds O(n) link rows, not a copy of every parent per supersede.
        A step that already waits on the newcomer gives the old slot up (``released``,
        counted as done).
        """
        now, superseded = self.now(), ActionStatus.SUPERSEDED.value
        waiting = (ParentLink.action_id == old, ParentLink.state == "waiting")
        zeros = []
        on_newcomer = select(ParentLink.step_id).where(
            ParentLink.action_id == newcomer, ParentLink.state == "waiting"
        )
        released = s.execute(
            select(ParentLink.id, ParentLink.step_id).where(
                *waiting, ParentLink.step_id.in_(on_newcomer)
            )
        ).all()
        for link_id, step_id in released:
            if _changed(s, _retire(link_id, "released", superseded, now)):
                zero = self._count_member(s, step_id, successful=True)
                if zero:
                    zeros.append(zero)
        ancestry = s.scalar(select(Action.ancestry).where(Action.id == old)) or ","
        starter = int(ancestry.rstrip(",").rsplit(",", 1)[-1]) if ancestry != "," else None
        own = s.execute(
            select(ParentLink.id, ParentLink.step_id, ParentLink.call)
            .join(Step, Step.id == ParentLink.step_id)
            .where(*waiting, Step.action_id == starter)
        ).all()
        for link_id, step_id, call in own:
            if _changed(s, _retire(link_id, "transferred", superseded, now)):
                s.add(
                    ParentLink(
                        step_id=step_id,
                        action_id=newcomer,
                        kind="action",
                        state="waiting",
                        call=call,
                        created_at=now,
                        updated_at=now,
                    )
                )
        s.execute(update(ParentLink).where(*waiting).values(action_id=newcomer, updated_at=now))
        return zeros

    # -- performing -------------------------------------------------------------------

    def perform(self, action_id: int) -> None:
        """The lane let this action perform: start it and run its steps."""
        if self.begin(action_id):
            self.handoff(self.run_steps(action_id))
            return
        with self._session() as s:
            status = s.scalar(select(Action.status).where(Action.id == action_id))
        if status == ActionStatus.SUPERSEDED.value:
            # Superseded at the lane front before it could begin: release the lane.
            self.handoff(self.completion_effects(action_id))

    def begin(self, action_id: int) -> bool:
        """pending -> performing; erase the achievement; schedule the timeout."""
        with self._session() as s:
            began = s.execute(
                update(Action)
                .where(Action.id == action_id, Action.status == PENDING)
                .values(status=PERFORMING, started_at=self.now(), updated_at=self.now())
                .returning(Action.name, Action.timeout_seconds, Action.checksum_key)
            ).first()
            if began is None:
                row = s.execute(
                    select(Action.status, Action.name, Action.timeout_seconds).where(
                        Action.id == action_id
                    )
                ).first()
                if row is None or row.status != PERFORMING:
                    return False
                if row.timeout_seconds is not None and self._recovering():
                    # The run that began it may have died before it scheduled the timeout;
                    # an early check re-schedules itself for the time left.
                    self._send([_timeout_job(action_id, row.name, 0)])
                return True
            name, timeout, checksum_key = began
            s.execute(delete(Achievement).where(Achievement.checksum_key == checksum_key))
            s.commit()
        signals.action_started.send(sender=self.stepped, action_id=action_id, name=name)
        if timeout is not None:
            self._send([_timeout_job(action_id, name, timeout)])
        return True

    def resume(self, action_id: int) -> None:
        """``stepped.resume``: a pending action reached the front of its lane."""
        with self._session() as s:
            status = s.scalar(select(Action.status).where(Action.id == action_id))
        if status == PENDING:
            self.perform(action_id)
        elif status == PERFORMING:
            self.handoff(self.run_steps(action_id))
        elif status is not None:
            self.handoff(self.completion_effects(action_id))

    def run_steps(self, action_id: int) -> list[int]:
        """Run steps until one waits; return parent steps whose last member reported."""
        while True:
            with self._session() as s:
                row = s.execute(
                    select(
                        Action.status,
                        Action.actor_type,
                        Action.name,
                        Action.outbound,
                        Action.current_step_index,
                        Step.id,
                        Step.status,
                        Step.pending_actions_count,
                    )
                    .outerjoin(
                        Step,
                        (Step.action_id == Action.id)
                        & (Step.definition_index == Action.current_step_index),
                    )
                    .where(Action.id == action_id)
                ).first()
            if row is None or row[0] != PERFORMING:
                return self._recover_final(action_id, None if row is None else row[0])
            _, actor_type, name, outbound, index, step_id, step_status, pending = row
            bodies = self.definition_for(actor_type, name).steps_for_run()
            if index >= len(bodies):
                if outbound:
                    return []
                return self.complete_action(action_id, ActionStatus.SUCCEEDED.value)[1]
            if step_id is None:
                outcome, closed_as = self.perform_step(action_id, index, bodies[index])
                while outcome == "done":  # closed at once: go on without reading again
                    if closed_as == StepStatus.FAILED.value:
                        return self.complete_action(action_id, ActionStatus.FAILED.value)[1]
                    index += 1
                    if index >= len(bodies):
                        if outbound:
                            return []
                        return self.complete_action(action_id, ActionStatus.SUCCEEDED.value)[1]
                    outcome, closed_as = self.perform_step(action_id, index, bodies[index])
                # waiting: its members carry on; exists: its runner does; stopped: final
                return []
            if step_status == StepStatus.PERFORMING.value:
                if pending > 0:
                    self._redispatch(step_id)
                    return []
                self._close_step(step_id)
                continue
            if step_status == StepStatus.FAILED.value:
                return self.complete_action(action_id, ActionStatus.FAILED.value)[1]
            self._bump(action_id, index)

    def _recover_final(self, action_id: int, status: str | None) -> list[int]:
        """A redelivery found the action final: redo its idempotent completion effects
        (its first run may have died after completing it, before telling its parents)."""
        if status is None or status in OPEN or not self._recovering():
            return []
        return self.completion_effects(action_id)

    def _bump(self, action_id: int, index: int) -> None:
        with self._session() as s:
            s.execute(
                update(Action)
                .where(Action.id == action_id, Action.current_step_index == index)
                .values(current_step_index=index + 1, updated_at=self.now())
            )
            s.commit()

    def perform_step(
        self, action_id: int, index: int, body: Callable[..., Any]
    ) -> tuple[str, str | None]:
        """Run one step body in one transaction; send its chord after commit.

        The body runs before Stepped writes anything, so no write lock is held while it
        runs (SQLite has one per database); its changes, the ``Step`` row and the
        intents are then written in one short transaction. The row is unique per
        (action, index): a second delivery that ran the body concurrently rolls its
        changes back, and one that comes after the commit never runs the body.

        Returns ``(outcome, status)``: ``("waiting", None)`` (members sent), ``("done",
        status)`` (the step closed at once as ``status``), ``("exists", None)`` (another
        delivery already ran it) or ``("stopped", None)`` (the action is no longer
        performing).
        """
        started = self.now()
        with self._session() as s:
            action = s.get_one(Action, action_id)
            if action.status != PERFORMING:
                return "stopped", None
            actor = self.stepped.actors.load_ref(action.actor_type, action.actor_id, s)
            args = self.stepped.actors.load(action.arguments, s)
            context = StepContext(self.stepped, s, action, actor)
            try:
                body(context, actor, *args)
                s.flush()  # the body's own writes: a constraint they break is the body's
            except OperationalError:
                raise  # the database (locked, deadlock, gone), not the body: run again
            except Exception as exc:
                s.rollback()
                self._report_or_raise(exc, action_id, index, "step")
                outcome = self._failed_step(action_id, index, started, error_record(exc))
                return outcome, StepStatus.FAILED.value
            step = self._new_step(action_id, index, started, context)
            s.add(step)
            try:
                s.flush()
            except IntegrityError:
                s.rollback()
                return "exists", None
            links, jobs = self._record_intents(s, step, context)
            s.commit()
            step_id, step_status = step.id, step.status
        signals.step_started.send(sender=self.stepped, action_id=action_id, index=index)
        self._send(jobs)
        if links:
            self._send(self._header(step_id, links))
            return "waiting", None
        signals.step_completed.send(sender=self.stepped, step_id=step_id, status=step_status)
        return "done", step_status

    def _new_step(self, action_id: int, index: int, started: Any, context: StepContext) -> Step:
        """The Step row as the body left it: failed, closed at once, or waiting on members."""
        members = sum(1 for intent in context.intents if intent.kind != "job")
        if context.status == StepStatus.FAILED.value:
            status, members = StepStatus.FAILED.value, 0
        else:
            status = StepStatus.PERFORMING.value if members else StepStatus.SUCCEEDED.value
        return Step(
            action_id=action_id,
            definition_index=index,
            status=status,
            pending_actions_count=members,
            started_at=started,
            completed_at=None if members else self.now(),
        )

    def _failed_step(self, action_id: int, index: int, started: Any, error: dict[str, Any]) -> str:
        with self._session() as s:
            step = Step(
                action_id=action_id,
                definition_index=index,
                status=StepStatus.FAILED.value,
                started_at=started,
                completed_at=self.now(),
                error=error,
            )
            s.add(step)
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                return "exists"
            step_id = step.id
        signals.step_completed.send(
            sender=self.stepped, step_id=step_id, status=StepStatus.FAILED.value
        )
        return "done"

    def _record_intents(
        self, s: Session, step: Step, context: StepContext
    ) -> tuple[list[ParentLink], list[Job]]:
        action = context.action
        jobs: list[Job] = []
        if step.status == StepStatus.FAILED.value:
            return [], jobs
        links = []
        for intent in context.intents:
            if intent.kind == "job":
                jobs.append(
                    Job(
                        "job",
                        str(action.job),
                        str(action.job),
                        [action.id],
                        display_args=[action.id],
                    )
                )
                continue
            call = intent.call if intent.kind == "action" else {"seconds": intent.seconds}
            links.append(
                ParentLink(
                    step_id=step.id,
                    kind=intent.kind,
                    state="waiting",
                    call=call,
                    created_at=self.now(),
                    updated_at=self.now(),
                )
            )
        s.add_all(links)
        if not links and action.current_step_index == step.definition_index:
            action.current_step_index = step.definition_index + 1
        s.flush()
        return links, jobs

    def _header(self, step_id: int, links: Iterable[ParentLink]) -> list[Job]:
        header = []
        for link in links:
            call = dict(link.call or {})
            if link.kind == "wait":
                seconds = float(call.get("seconds", 0))
                header.append(
                    Job("wait", "wait", WAIT, [link.id], countdown=seconds, display_args=[seconds])
                )
                continue
            start = StartCall(call["actor"], call["name"], call["args"], link.id)
            definition = self.definition_for(start.actor[0], start.name)
            header.append(
                Job(
                    "action",
                    start.name,
                    START,
                    start.message(),
                    display_args=start.args,
                    actor=start.actor,
                    queue=definition.resolved("action_queue"),
                )
            )
        return StepChord(step_id, header).header

    def _redispatch(self, step_id: int) -> None:
        """A redelivered step: resend members that no delivery has claimed yet."""
        with self._session() as s:
            links = s.scalars(
                select(ParentLink).where(
                    ParentLink.step_id == step_id,
                    ParentLink.state == "waiting",
                    ParentLink.action_id.is_(None),
                    ParentLink.kind == "action",
                )
            ).all()
            for link in links:
                s.expunge(link)
        if links and not self.stepped.dispatcher.local:
            self._send(self._header(step_id, links))

    # -- the join -----------------------------------------------------------------------

    def _count_member(self, s: Session, step_id: int, successful: bool) -> int | None:
        pending = s.execute(
            update(Step)
            .where(Step.id == step_id)
            .values(
                pending_actions_count=Step.pending_actions_count - 1,
                unsuccessful_actions_count=Step.unsuccessful_actions_count
                + (0 if successful else 1),
            )
            .returning(Step.pending_actions_count)
        ).scalar_one()
        return step_id if pending == 0 else None

    def _finish_link(self, s: Session, link_id: int, outcome: str, successful: bool) -> int | None:
        """Count one member's outcome, once; the step id if it was the last one."""
        step_id = s.scalar(select(ParentLink.step_id).where(ParentLink.id == link_id))
        done = _changed(
            s,
            update(ParentLink)
            .where(ParentLink.id == link_id, ParentLink.state == "waiting")
            .values(state="done", outcome=outcome, updated_at=self.now()),
        )
        if not done or step_id is None:
            return None
        return self._count_member(s, step_id, successful)

    def finish_wait(self, link_id: int) -> None:
        """``stepped.wait``: a timed wait elapsed."""
        with self._session() as s:
            zero = self._finish_link(s, link_id, "succeeded", True)
            s.commit()
        self.handoff([zero] if zero else self._follow_link(link_id))

    def _follow_link(self, link_id: int) -> list[int]:
        """In a redelivery: the step of an already counted link, if its action performs."""
        if not self._recovering():
            return []
        with self._session() as s:
            step_id = s.scalar(_counted_links_of_performing(ParentLink.id == link_id))
        return [] if step_id is None else [step_id]

    def advance_step(self, step_id: int) -> list[int]:
        """``stepped.advance``: close a step whose members all reported, run what's next."""
        with self._session() as s:
            action_id = s.scalar(select(Step.action_id).where(Step.id == step_id))
        if action_id is None:
            return []
        self._close_step(step_id)
        return self.run_steps(action_id)

    def _close_step(self, step_id: int) -> None:
        with self._session() as s:
            unsuccessful = s.scalar(
                select(Step.unsuccessful_actions_count).where(Step.id == step_id)
            )
            status = StepStatus.FAILED.value if unsuccessful else StepStatus.SUCCEEDED.value
            closed = _changed(
                s,
                update(Step)
                .where(
                    Step.id == step_id,
                    Step.status == StepStatus.PERFORMING.value,
                    Step.pending_actions_count <= 0,
                )
                .values(status=status, completed_at=self.now()),
            )
            s.commit()
        if closed:
            signals.step_completed.send(sender=self.stepped, step_id=step_id, status=status)

    # -- completing ---------------------------------------------------------------------

    def complete_action(self, action_id: int, status: str) -> tuple[bool, list[int]]:
        """Give an open action its final status, run after callbacks, report upward.

        Returns ``(completed_by_this_call, parent steps whose last member reported)``.
        Completing an action that is already final re-runs only the idempotent effects.
        """
        with self._session() as s:
            done = _changed(
                s,
                update(Action)
                .where(Action.id == action_id, Action.status.in_(OPEN))
                .values(status=status, completed_at=self.now(), updated_at=self.now()),
            )
            row = s.execute(
                select(
                    Action.actor_type,
                    Action.name,
                    Action.checksum,
                    Action.checksum_key,
                    Action.concurrency_key,
                ).where(Action.id == action_id)
            ).one()
            callbacks: list[Callable[..., Any]] = []
            achieve = False
            if done:
                definition = self.definition_for(row.actor_type, row.name)
                if status in COMPLETION_STATUSES:
                    callbacks = definition.after_callbacks(status)
                achieve = status == ActionStatus.SUCCEEDED.value and row.checksum is not None
            if done and not callbacks and not achieve:
                # Nothing runs in between: tell the parents in the same transaction.
                successful = status == ActionStatus.SUCCEEDED.value
                zeros = self._report_parents(s, action_id, status, successful)
                s.commit()
                signals.action_completed.send(
                    sender=self.stepped, action_id=action_id, status=status
                )
                self.move_lane(row.concurrency_key, action_id)
                return True, zeros
            s.commit()
        if not done:
            return False, self.completion_effects(action_id)
        self._after_callbacks(action_id, status, callbacks, row.checksum_key, row.checksum)
        signals.action_completed.send(sender=self.stepped, action_id=action_id, status=status)
        return True, self.completion_effects(action_id)

    def _after_callbacks(
        self,
        action_id: int,
        status: str,
        callbacks: list[Callable[..., Any]],
        checksum_key: str,
        checksum: str | None,
        start: int = 0,
    ) -> None:
        """Run callbacks from ``start`` on, each in its own transaction; write the achievement.

        A callback's changes and its count commit together, so a redelivery after a crash
        resumes at ``start`` = the callbacks already counted and runs none twice.
        """
        for callback in callbacks[start:]:
            with self._session() as s:
                action = s.get_one(Action, action_id)
                action._stepped = self.stepped
                actor = self.stepped.actors.load_ref(action.actor_type, action.actor_id, s)
                args = self.stepped.actors.load(action.arguments, s)
                try:
                    callback(action, actor, *args)
                    self._count_callback(s, action_id, "after_callbacks_succeeded_count")
                    s.commit()
                except Exception as exc:
                    s.rollback()
                    with self._session() as counting:
                        self._count_callback(counting, action_id, "after_callbacks_failed_count")
                        counting.commit()
                    self._report_or_raise(exc, action_id, None, f"after_{status}")
        if status != ActionStatus.SUCCEEDED.value or checksum is None:
            return
        with self._session() as s:
            failed = s.scalar(
                select(Action.after_callbacks_failed_count).where(Action.id == action_id)
            )
            if not failed:
                self._achieve(s, checksum_key, checksum)
                s.commit()

    @staticmethod
    def _count_callback(s: Session, action_id: int, column: str) -> None:
        counter = getattr(Action, column)
        s.execute(
            update(Action)
            .where(Action.id == action_id)
            .values({column: counter + 1})
            .execution_options(synchronize_session=False)
        )

    def _resume_callbacks(self, action_id: int) -> None:
        """A redelivery: run the after callbacks a crashed first run never got to."""
        with self._session() as s:
            row = s.execute(
                select(
                    Action.status,
                    Action.actor_type,
                    Action.name,
                    Action.checksum,
                    Action.checksum_key,
                    Action.after_callbacks_succeeded_count,
                    Action.after_callbacks_failed_count,
                ).where(Action.id == action_id)
            ).first()
        if row is None or row.status not in COMPLETION_STATUSES:
            return
        callbacks = self.definition_for(row.actor_type, row.name).after_callbacks(row.status)
        counted = row.after_callbacks_succeeded_count + row.after_callbacks_failed_count
        if counted < len(callbacks):
            self._after_callbacks(
                action_id, row.status, callbacks, row.checksum_key, row.checksum, start=counted
            )

    def _achieve(self, s: Session, checksum_key: str, checksum: str) -> None:
        updated = _changed(
            s,
            update(Achievement)
            .where(Achievement.checksum_key == checksum_key)
            .values(checksum=checksum, created_at=self.now()),
        )
        if not updated:
            s.add(Achievement(checksum_key=checksum_key, checksum=checksum, created_at=self.now()))

    def completion_effects(self, action_id: int) -> list[int]:
        """Report a final action to its waiting parents and move its lane on (idempotent)."""
        if self._recovering():
            self._resume_callbacks(action_id)
        with self._session() as s:
            action = s.get(Action, action_id)
            if action is None or action.status in OPEN:
                return []
            successful = (
                action.status == ActionStatus.SUCCEEDED.value
                and not action.after_callbacks_failed_count
            )
            status, key = action.status, action.concurrency_key
            zeros = self._report_parents(s, action_id, status, successful)
            if self._recovering():
                zeros.extend(self._open_parent_steps(s, action_id))
            s.commit()
        # Also when superseded: it may have reached the lane front before its superseder
        # removed it (superseding writes SQL first), and then it must release the lane.
        self.move_lane(key, action_id)
        return list(dict.fromkeys(z for z in zeros if z))

    def _report_parents(
        self, s: Session, action_id: int, status: str, successful: bool
    ) -> list[int]:
        """Count the outcome for every step still waiting on the action (once each)."""
        link_ids = s.scalars(
            select(ParentLink.id).where(
                ParentLink.action_id == action_id, ParentLink.state == "waiting"
            )
        ).all()
        zeros = [self._finish_link(s, link_id, status, successful) for link_id in link_ids]
        return [z for z in zeros if z]

    @staticmethod
    def _open_parent_steps(s: Session, action_id: int) -> list[int]:
        """Steps this action already reported to whose action still performs.

        A redelivered message follows them up (``advance_step`` is idempotent): the run
        that died may have counted the last member and never advanced the step, or died
        in a later step of the parent that it ran inline.
        """
        query = _counted_links_of_performing(ParentLink.action_id == action_id)
        return list(s.scalars(query.order_by(ParentLink.step_id)).all())

    def move_lane(self, key: str, action_id: int) -> None:
        """Release ``action_id``'s place in its lane and start whoever is next."""
        outcome, other = self.stepped.lanes.release(key, action_id)
        if outcome not in ("next", "empty"):
            self.stepped.lanes.leave(key, action_id)
        if other is None or outcome not in ("next", "other"):
            return
        with self._session() as s:
            row = s.execute(
                select(
                    Action.name, Action.status, Action.arguments, Action.actor_type, Action.actor_id
                ).where(Action.id == other)
            ).first()
        if row is not None and row.status == PENDING:
            self._send(
                [
                    Job(
                        "action",
                        row.name,
                        RESUME,
                        [other],
                        display_args=row.arguments,
                        actor=[row.actor_type, row.actor_id],
                    )
                ]
            )
        elif row is not None and row.status == ActionStatus.SUPERSEDED.value:
            # At the lane front but superseded (before its superseder removed it from
            # the lane): it will never run, so release it too.
            self.move_lane(key, other)

    # -- outside events --------------------------------------------------------------------

    def complete(self, action_id: int, status: str) -> Action | None:
        """``stepped.complete``: complete one action from outside."""
        if status not in COMPLETION_STATUSES:
            raise ValueError(f"status must be one of {', '.join(COMPLETION_STATUSES)}")
        completed, zeros = self.complete_action(action_id, status)
        self.handoff(zeros)
        return self.stepped.get_action(action_id) if completed else None

    def fire_timeout(self, action_id: int) -> bool:
        """``stepped.timeout``: time the action out if it still performs past its limit."""
        with self._session() as s:
            action = s.get(Action, action_id)
            if action is None or action.status != PERFORMING or action.timeout_seconds is None:
                final = None if action is None else action.status
                s.close()
                if final == ActionStatus.TIMED_OUT.value:  # a redelivered timeout
                    self.handoff(self._recover_final(action_id, final))
                return False
            started, limit, name = action.started_at, action.timeout_seconds, action.name
        if started is None:
            return False
        remaining = (started + timedelta(seconds=limit) - self.now()).total_seconds()
        if remaining > 0:
            self._send([_timeout_job(action_id, name, remaining)])
            return False
        self.complete(action_id, ActionStatus.TIMED_OUT.value)
        return True

    def complete_job(self, action_id: int | None, status: str) -> None:
        """``stepped.complete``: the message of ``complete_later``."""
        if action_id is not None:
            self.complete(action_id, status)

    # -- jobs ----------------------------------------------------------------------------

    def run_job(self, job: Job) -> bool:
        """Perform a job in this process (capture and eager modes)."""
        if job.task == START:
            self.start(StartCall.from_message(job.message[0]), root=job.message[0]["link"] is None)
        elif job.task == RESUME:
            self.resume(int(job.message[0]))
        elif job.task == ADVANCE:
            self._drain([int(job.message[0])])
        elif job.task == WAIT:
            self.finish_wait(int(job.message[0]))
        elif job.task == TIMEOUT:
            return self.fire_timeout(int(job.message[0]))
        elif job.task == COMPLETE:
            self.complete_job(job.message[0], job.message[1])
        elif job.kind == "job":
            return self.stepped.run_user_job(job)
        return True

    # -- exceptions ----------------------------------------------------------------------

    def _report_or_raise(
        self, exc: BaseException, action_id: int | None, index: int | None, block: str
    ) -> None:
        if not self.stepped.report_exception(
            exc, action_id=action_id, step_index=index, block=block
        ):
            raise exc


def error_record(exc: BaseException, frames: int = 5) -> dict[str, Any]:
    """What a row keeps of an exception: class, message and the last traceback frames."""
    tail = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-frames)
    return {"type": type(exc).__name__, "message": str(exc), "traceback": "".join(tail)}


def _counted_links_of_performing(*where: Any) -> Any:
    """SELECT the steps of already counted links whose action still performs."""
    return (
        select(ParentLink.step_id)
        .join(Step, Step.id == ParentLink.step_id)
        .join(Action, Action.id == Step.action_id)
        .where(ParentLink.state == "done", Action.status == PERFORMING, *where)
    )


def _timeout_job(action_id: int, name: str, countdown: float) -> Job:
    """The ``stepped.timeout`` message of an action, due in ``countdown`` seconds."""
    return Job("timeout", name, TIMEOUT, [action_id], countdown=countdown, display_args=[action_id])


def _retire(link_id: int, state: str, outcome: str, now: Any) -> Any:
    """UPDATE ending a waiting link without counting it (guarded: once)."""
    return (
        update(ParentLink)
        .where(ParentLink.id == link_id, ParentLink.state == "waiting")
        .values(state=state, outcome=outcome, updated_at=now)
    )


def _tenancy(call: StartCall) -> str:
    return f"{call.actor[0]}/{call.actor[1]}/{call.name}"
