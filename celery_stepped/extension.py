"""``Stepped``: the extension object that binds Celery, SQL and Redis together."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Concatenate, ParamSpec, overload

import redis as redis_lib
from celery import Celery
from celery import signals as celery_signals
from celery.result import AsyncResult
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, selectinload, sessionmaker
from sqlalchemy.pool import StaticPool

from . import signals
from .actors import ActorRegistry
from .canvas import COMPLETE, Dispatcher, Job
from .definition import SteppedAction, actor_class_of, function_step
from .errors import ActionNotFound, ConfigurationError
from .lanes import Lanes
from .models import Action, Base, Step, utcnow
from .registry import Registry
from .runtime import Runtime
from .statuses import COMPLETION_STATUSES, ActionStatus

if TYPE_CHECKING:
    from .testing import JobQueue

__all__ = ["Stepped"]

logger = logging.getLogger("celery_stepped")
_instances: weakref.WeakSet[Stepped] = weakref.WeakSet()
P = ParamSpec("P")


def _configure_sqlite(engine: Engine) -> None:
    """WAL, a busy timeout and NORMAL sync: several worker processes on one file."""

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def make_engine(database_url: str) -> Engine:
    """An engine for ``database_url``, tuned for SQLite when it is one."""
    if database_url.startswith("sqlite"):
        memory = database_url in ("sqlite://", "sqlite:///:memory:")
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 30, "check_same_thread": False}}
        if memory:
            kwargs["poolclass"] = StaticPool
        engine = create_engine(database_url, **kwargs)
        _configure_sqlite(engine)
        return engine
    return create_engine(database_url, pool_pre_ping=True)


def _dispose_after_fork(**_: Any) -> None:
    """In a fresh pool process: never reuse the parent's database connections."""
    for instance in list(_instances):
        instance.engine.dispose(close=False)


celery_signals.worker_process_init.connect(_dispose_after_fork, weak=False)


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

    _current: ClassVar[Stepped | None] = None

    def __init__(
        self,
        app: Celery,
        *,
        database_url: str | None = None,
        engine: Engine | None = None,
        session_factory: Callable[[], Session] | None = None,
        redis_url: str | None = None,
        redis: redis_lib.Redis | None = None,
        queue: str | None = None,
        handle_exceptions: tuple[type[BaseException], ...] | None = None,
        namespace: str | None = None,
    ) -> None:
        conf = app.conf
        self.app = app
        database_url = database_url or conf.get("stepped_database_url")
        redis_url = redis_url or conf.get("stepped_redis_url")
        if engine is None and session_factory is None and not database_url:
            raise ConfigurationError(
                "Stepped needs a database: pass database_url=, engine= or session_factory=, "
                "or set app.conf.stepped_database_url"
            )
        if redis is None and not redis_url:
            raise ConfigurationError(
                "Stepped needs Redis for its lanes: pass redis_url= or redis=, "
                "or set app.conf.stepped_redis_url"
            )
        self.queue: str = queue or conf.get("stepped_queue") or "stepped"
        handled = handle_exceptions
        if handled is None:
            handled = conf.get("stepped_handle_exceptions") or (Exception,)
        self.handle_exceptions: tuple[type[BaseException], ...] = tuple(handled)
        if session_factory is None:
            engine = engine or make_engine(str(database_url))
            session_factory = sessionmaker(engine, expire_on_commit=False)
        self.session_factory: Callable[[], Session] = session_factory
        self.engine: Engine = engine or self._engine_of(session_factory)
        if self.engine.dialect.name == "sqlite" and engine is not None and database_url is None:
            _configure_sqlite(self.engine)
        self.redis: redis_lib.Redis = redis or redis_lib.Redis.from_url(str(redis_url))
        self.clock: Callable[[], datetime] = utcnow
        self.namespace: str = namespace or conf.get("stepped_namespace") or app.main or "celery"
        self.lanes = Lanes(self.redis, namespace=self.namespace)
        self.registry = Registry()
        self.actors = ActorRegistry(self.session_factory)
        self.runtime = Runtime(self)
        self.dispatcher = Dispatcher(self)
        from .tasks import register_tasks

        self.tasks = register_tasks(self)
        app.stepped = self
        app.stepped_action = self.action
        Stepped._current = self
        _instances.add(self)

    @staticmethod
    def _engine_of(session_factory: Callable[[], Session]) -> Engine:
        with session_factory() as session:
            bind = session.get_bind()
        if not isinstance(bind, Engine):
            bind = bind.engine
        return bind

    @classmethod
    def current(cls) -> Stepped:
        """The most recently created instance (used by ``Action.actor``)."""
        if cls._current is None:
            raise ConfigurationError("no Stepped instance has been created")
        return cls._current

    # -- defining -------------------------------------------------------------------------

    @overload
    def action(self, name_or_fn: Callable[Concatenate[Any, P], Any]) -> SteppedAction[P]: ...

    @overload
    def action(
        self,
        name_or_fn: str | None = None,
        *,
        actor: type | None = None,
        outbound: bool = False,
        timeout: Any = None,
        job: Any = None,
        concurrency_key: Any = None,
        checksum: Callable[..., Any] | None = None,
        checksum_key: Any = None,
        queue: str | None = None,
    ) -> Any: ...

    def action(
        self,
        name_or_fn: Any = None,
        *,
        actor: type | None = None,
        outbound: bool = False,
        timeout: Any = None,
        job: Any = None,
        concurrency_key: Any = None,
        checksum: Callable[..., Any] | None = None,
        checksum_key: Any = None,
        queue: str | None = None,
    ) -> Any:
        """Define an action (``app.stepped_action``): bare decorator, decorator factory,
        or ``app.stepped_action("name", actor=Car)`` returning the definition."""
        options = dict(
            outbound=outbound,
            timeout=timeout,
            job=job,
            concurrency_key=concurrency_key,
            checksum=checksum,
            checksum_key=checksum_key,
            queue=queue,
        )
        if callable(name_or_fn) and not isinstance(name_or_fn, str):
            return self._define_function(name_or_fn, None, actor, options)
        if isinstance(name_or_fn, str) and (actor is not None or _any_option(options)):
            return self._define(name_or_fn, actor, options)
        if isinstance(name_or_fn, str):
            return self._define(name_or_fn, None, options)

        def decorate(fn: Callable[..., Any]) -> SteppedAction[Any]:
            return self._define_function(fn, name_or_fn, actor, options)

        return decorate

    def _define_function(
        self,
        fn: Callable[..., Any],
        name: str | None,
        actor: type | None,
        options: dict[str, Any],
    ) -> SteppedAction[Any]:
        definition = self._define(name or fn.__name__, actor or actor_class_of(fn), options)
        definition.step(function_step(fn))
        definition.__doc__ = fn.__doc__
        return definition

    def adopt_function(
        self, definition: SteppedAction[Any], fn: Callable[..., Any]
    ) -> SteppedAction[Any]:
        """``@app.stepped_action("name")`` used as a decorator: ``fn`` is the first step."""
        definition.step(function_step(fn))
        if definition.actor_class is None:
            owner = actor_class_of(fn)
            if owner is not None:
                self.registry.remove(definition)
                definition.actor_class = owner
                self.registry.add(definition)
        return definition

    def _define(self, name: str, actor: type | None, options: dict[str, Any]) -> SteppedAction[Any]:
        job = options.get("job")
        if job is not None and not hasattr(job, "apply_async"):
            raise TypeError("job= takes a Celery task")
        cls = type(f"SteppedAction_{name}", (SteppedAction,), {"__module__": __name__})
        definition: SteppedAction[Any] = cls(self, name, actor=actor, **options)
        self.registry.add(definition)
        if definition.name not in self.app.tasks:
            self.app.register_task(definition)
        return definition

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

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session on the Stepped engine: commit on success, rollback on error."""
        session = self.session_factory()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def create_all(self) -> None:
        """Create the Stepped tables (quick start; production uses ``migrate``)."""
        Base.metadata.create_all(self.engine)

    def drop_all(self) -> None:
        """Drop the Stepped tables."""
        Base.metadata.drop_all(self.engine)

    def migrate(self, revision: str = "head") -> None:
        """Apply the shipped Alembic migrations up to ``revision``."""
        from .models.migrations import upgrade

        upgrade(self.engine, revision)

    def get_action(self, action_id: int) -> Action:
        """The action, detached, with its steps (and their children) loaded."""
        with self.session_factory() as session:
            action = session.scalar(
                select(Action)
                .where(Action.id == int(action_id))
                .options(
                    selectinload(Action.steps).selectinload(Step.actions),
                    selectinload(Action.parent_steps),
                )
            )
            if action is None:
                raise ActionNotFound(f"no action with id {action_id}")
            session.expunge_all()
        action._stepped = self
        return action

    # -- completing -------------------------------------------------------------------------

    def complete(self, action_or_id: Action | int, status: str = "succeeded") -> Action | None:
        """Complete one action (outbound, job-backed or any open one).

        Returns the completed action, or None when it was already final.
        """
        action_id = action_or_id.id if isinstance(action_or_id, Action) else action_or_id
        if action_id is None:
            raise ValueError("that action was never persisted")
        return self.runtime.complete(int(action_id), str(status))

    def _performing_outbound(self, actor: Any, name: str) -> Action | None:
        type_name, identity = self.actors.identify(actor)
        with self.session_factory() as session:
            return session.scalar(
                select(Action)
                .where(
                    Action.actor_type == type_name,
                    Action.actor_id == identity,
                    Action.name == name,
                    Action.outbound.is_(True),
                    Action.status == ActionStatus.PERFORMING.value,
                )
                .order_by(Action.id.desc())
                .limit(1)
            )

    def complete_outbound(self, actor: Any, name: str, status: str = "succeeded") -> Action | None:
        """Complete the performing outbound action ``name`` on ``actor`` (or None)."""
        _check_status(status)
        action = self._performing_outbound(actor, name)
        return None if action is None else self.complete(action.id, status)

    def complete_outbound_later(
        self, actor: Any, name: str, status: str = "succeeded"
    ) -> AsyncResult | None:
        """Enqueue completing the performing outbound action ``name`` on ``actor``."""
        _check_status(status)
        action = self._performing_outbound(actor, name)
        if action is None:
            return None
        job = Job(
            "complete",
            name,
            COMPLETE,
            [action.id, status],
            display_args=[status],
            actor=[action.actor_type, action.actor_id],
        )
        return self.dispatcher.send_one(job)

    # -- exceptions ---------------------------------------------------------------------------

    def report_exception(self, exc: BaseException, **context: Any) -> bool:
        """Log and signal ``exc`` if its class is handled; True when handled."""
        if not isinstance(exc, tuple(self.handle_exceptions)):
            return False
        logger.error(
            "stepped handled %s in %s (action %s, step %s): %s",
            type(exc).__name__,
            context.get("block"),
            context.get("action_id"),
            context.get("step_index"),
            exc,
            exc_info=exc,
        )
        signals.exception_handled.send(sender=self, exception=exc, **context)
        return True

    # -- testing --------------------------------------------------------------------------------

    def capture(self) -> AbstractContextManager[JobQueue]:
        """Hold every job Stepped would send in an in-process ``JobQueue``."""
        from .testing import capture

        return capture(self)

    def run_user_job(self, job: Job) -> bool:
        """Run a job-backed action's Celery task in this process (capture, eager)."""
        from .testing import run_user_job

        return run_user_job(self, job)

    # -- operations -----------------------------------------------------------------------------

    def repair(self, apply: bool = False) -> Any:
        """Rebuild lanes and pending step completions from SQL (see ``stepped repair``)."""
        from .repair import repair

        return repair(self, apply=apply)


def _any_option(options: dict[str, Any]) -> bool:
    return any(v not in (None, False) for v in options.values())


def _check_status(status: str) -> None:
    if status not in COMPLETION_STATUSES:
        raise ValueError(f"status must be one of {', '.join(COMPLETION_STATUSES)}")
