"""``Stepped``: reads the configuration and wires the parts together.

Nothing else happens here: every part receives its collaborators in its constructor
(see ARCHITECTURE.md for the layers), and ``Stepped``'s own methods delegate.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import redis as redis_lib
from celery import Celery
from celery import signals as celery_signals
from celery.result import AsyncResult
from sqlalchemy.engine import Engine as SqlEngine
from sqlalchemy.orm import Session

from . import signals
from .actors import ActorRegistry
from .backlog import Backlog
from .client import Client, check_status
from .completing import Completer
from .database import Database
from .defining import Definer
from .definition import SteppedAction
from .engine import Engine
from .errors import ConfigurationError
from .events import Events
from .healing import Healing
from .lane_repair import LaneRebuild
from .lanes import Lanes
from .messages import Message, TaskName
from .models import Action, Base, utcnow
from .outbox import BrokerOutbox, EagerOutbox, JobQueue, Outboxes
from .performing import Performer
from .registry import Registry
from .repair import Repair, RepairReport
from .results import RootReport
from .routing import Routes, queue_of_definition
from .starting import Starter
from .superseding import LaneEntry
from .tasks import RetryPolicy, Watch, register_tasks, watch_worker

__all__ = ["Stepped"]


def _required(database_url: Any, has_database: bool, redis_url: Any, redis: Any) -> None:
    if not has_database and not database_url:
        raise ConfigurationError(
            "Stepped needs a database: pass database_url=, engine= or session_factory=, "
            "or set app.conf.stepped_database_url"
        )
    if redis is None and not redis_url:
        raise ConfigurationError(
            "Stepped needs Redis for its lanes: pass redis_url= or redis=, "
            "or set app.conf.stepped_redis_url"
        )


class Stepped:
    """Celery extension running workflows as persisted trees of actions.

    Args:
        app: the Celery application; gains ``app.stepped_action`` and ``app.stepped``.
        database_url: SQLAlchemy URL of the Stepped tables (or ``engine=``, or
            ``session_factory=``); falls back to ``app.conf.stepped_database_url``.
        redis_url: Redis URL of the lanes (or ``redis=`` a client); falls back to
            ``app.conf.stepped_redis_url``.
        queue: queue of the internal tasks (``app.conf.stepped_queue``).
        namespace: carried by every Redis key of this instance, so apps sharing a
            Redis database keep apart (``app.conf.stepped_namespace``; default: the
            app's main name, or ``"celery"``).
        handle_exceptions: exception classes turned into failure
            (``app.conf.stepped_handle_exceptions``).

    Raises:
        ConfigurationError: a database or Redis setting is missing.
    """

    def __init__(
        self,
        app: Celery,
        *,
        database_url: str | None = None,
        engine: SqlEngine | None = None,
        session_factory: Callable[[], Session] | None = None,
        redis_url: str | None = None,
        redis: redis_lib.Redis | None = None,
        queue: str | None = None,
        handle_exceptions: tuple[type[BaseException], ...] | None = None,
        namespace: str | None = None,
    ) -> None:
        conf = app.conf
        database_url = database_url or conf.get("stepped_database_url")
        redis_url = redis_url or conf.get("stepped_redis_url")
        has_database = engine is not None or session_factory is not None
        _required(database_url, has_database, redis_url, redis)
        self.app = app
        self.queue: str = queue or conf.get("stepped_queue") or "stepped"
        handled = handle_exceptions or conf.get("stepped_handle_exceptions") or (Exception,)
        self.database = Database(database_url, engine, session_factory)
        self.session_factory: Callable[[], Session] = self.database.session_factory
        self.engine: SqlEngine = self.database.engine
        self.redis: redis_lib.Redis = redis or redis_lib.Redis.from_url(str(redis_url))
        self.clock: Callable[[], datetime] = utcnow
        self.namespace: str = namespace or conf.get("stepped_namespace") or app.main or "celery"
        self.events = Events(self, tuple(handled))
        self._wire()
        app.stepped = self
        app.stepped_action = self.action

    def _wire(self) -> None:
        """Build the parts, each with its collaborators."""
        sessions, clock = self.session_factory, self._now
        self.lanes = Lanes(self.redis, namespace=self.namespace)
        self.registry = Registry()
        self.actors = ActorRegistry(sessions)
        self.outboxes = Outboxes(
            self.app, BrokerOutbox(self.app, self.queue), EagerOutbox(self._run_message)
        )
        lookup, events = self.definition_for, self.events
        self.core = Engine(
            sessions,
            Starter(sessions, self.actors, self.lanes, lookup, events, clock),
            LaneEntry(sessions, self.lanes, events, clock),
            Performer(sessions, self.actors, lookup, self.registry.find, events, clock),
            Completer(sessions, self.actors, self.lanes, lookup, events, clock),
            self.outboxes,
            lookup,
            events,
            clock,
            Routes(sessions, queue_of_definition(lookup), self.queue),
        )
        self.client = Client(
            sessions, self.actors, self.registry, self.core, self.outboxes, lookup, clock
        )
        self.action = Definer(self.app, self.registry, self.client).action
        self.repairer = Repair(
            sessions, self.lanes, self.core.entry, self.core.performer, lookup, self.outboxes, clock
        )
        rebuild = LaneRebuild(sessions, self.lanes, self.core.entry)
        waiting = self._waiting
        self.healing = Healing(sessions, self.lanes, rebuild, lookup, clock, waiting)
        self._register_tasks()
        self.report = RootReport(self.app, sessions)
        self._connect_report()

    def _waiting(self, queue: str | None) -> int | None:
        """Messages the broker holds in ``queue`` (None: Stepped's own queue)."""
        return self.outboxes.waiting(queue or self.queue)

    def _register_tasks(self) -> None:
        """The internal tasks, their retry policy, and what a worker checks at start."""
        conf = self.app.conf
        policy = RetryPolicy(
            int(conf.get("stepped_store_retries", 8)),
            float(conf.get("stepped_store_retry_backoff", 1.0)),
        )
        self.tasks = register_tasks(
            self.app, self.core.handlers(), self.core.delivering, policy, self.core.give_up
        )
        sweep_after = float(conf.get("stepped_outbox_sweep_after") or 60)
        sweep_every = float(conf.get("stepped_outbox_sweep_every") or 30)
        watch_worker(self.app, Watch(self.queue, self._sweep, sweep_after, sweep_every))

    def _connect_report(self) -> None:
        """Report final roots to Celery (``results.RootReport``): completed, short
        circuited, or whose start message expired."""
        signals.action_completed.connect(self.report.on_completed, sender=self, weak=False)
        signals.action_short_circuited.connect(
            self.report.on_short_circuit, sender=self, weak=False
        )
        start_task = self.tasks[TaskName.START]
        celery_signals.task_revoked.connect(self.report.on_revoked, sender=start_task, weak=False)

    def _now(self) -> datetime:
        return self.clock()

    def _run_message(self, message: Message) -> bool:
        return self.core.run_message(message)

    @property
    def handle_exceptions(self) -> tuple[type[BaseException], ...]:
        """Exception classes turned into failure, read at run time."""
        return self.events.handle_exceptions

    @handle_exceptions.setter
    def handle_exceptions(self, value: tuple[type[BaseException], ...]) -> None:
        self.events.handle_exceptions = tuple(value)

    def definition_for(self, actor_type: str, name: str) -> SteppedAction[Any]:
        """The definition of ``name`` for the actor type called ``actor_type``."""
        return self.registry.find(self.actors.resolve(actor_type).cls, name)

    def register_actor(
        self,
        cls: type,
        *,
        identify: Callable[[Any], str],
        load: Callable[[str], Any],
        type_name: str | None = None,
    ) -> None:
        """Make ``cls`` an actor type: ``identify(obj) -> str``, ``load(str) -> obj``."""
        self.actors.register(cls, identify=identify, load=load, type_name=type_name)

    # -- database ---------------------------------------------------------------------------

    def session(self) -> AbstractContextManager[Session]:
        """A session on the Stepped engine: commit on success, rollback on error."""
        return self.database.session()

    def create_all(self) -> None:
        """Create the Stepped tables (quick start; production uses ``migrate``)."""
        from .models.migrations import stamp

        Base.metadata.create_all(self.engine)
        stamp(self.engine)

    def drop_all(self) -> None:
        """Drop the Stepped tables."""
        Base.metadata.drop_all(self.engine)

    def migrate(self, revision: str = "head") -> None:
        """Apply the shipped Alembic migrations up to ``revision``."""
        from .models.migrations import upgrade

        upgrade(self.engine, revision)

    def get_action(self, action_id: int) -> Action:
        """The action, detached, with its steps (and their children) loaded."""
        return self.client.get_action(action_id)

    # -- completing and operating -------------------------------------------------------

    def complete(self, action_or_id: Action | int, status: str = "succeeded") -> Action | None:
        """Complete one action (outbound, job-backed or any open one).

        Returns the completed action, or None when it was already final.
        """
        action_id = action_or_id.id if isinstance(action_or_id, Action) else action_or_id
        if action_id is None:
            raise ValueError("that action was never persisted")
        check_status(str(status))
        return self.client.complete(int(action_id), str(status))

    def complete_outbound_later(
        self, actor: Any, name: str, status: str = "succeeded"
    ) -> AsyncResult:
        """Enqueue completing the outbound action ``name`` performing on ``actor`` when
        the message runs."""
        return self.client.complete_outbound_later(actor, name, status)

    def sweep_outbox(self, older_than: float = 60.0) -> int:
        """Send again the messages a crash left unsent (outbox entries older than
        ``older_than`` seconds); workers do this at start and periodically."""
        return self.core.sweep(older_than, Backlog(self._waiting))

    def _sweep(self, older_than: float) -> int:
        """What a worker does at start and every ``stepped_outbox_sweep_every`` seconds:
        the outbox sweep, then healing the lanes of stalled pending actions."""
        sent = self.sweep_outbox(older_than)
        self.core.drive(self.healing.heal(older_than))
        return sent

    def report_exception(self, exc: BaseException, **context: Any) -> bool:
        """Log and signal ``exc`` if its class is handled; True when handled."""
        return self.events.handled(exc, **context)

    def capture(self) -> AbstractContextManager[JobQueue]:
        """Hold every message Stepped would send in an in-process ``JobQueue``."""
        return self.outboxes.capture(JobQueue(self._run_message, self.actors.identify))

    def repair(self, apply: bool = False) -> RepairReport:
        """Rebuild lanes and pending step completions from SQL (see ``stepped repair``)."""
        return self.repairer.run(apply=apply)
