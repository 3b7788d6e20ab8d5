"""Durable records of celery_stepped: SQLAlchemy 2.0 typed models.

``Action``, ``Step``, ``Achievement`` are public (API.md section 9); ``ParentLink`` is the
join record between a step and what it waits on (a child action or a timed wait).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from ..errors import ConfigurationError
from ..statuses import FINAL_STATUSES, ActionStatus, StepStatus

__all__ = [
    "ACTIONS",
    "LINKS",
    "STEPS",
    "Achievement",
    "Action",
    "Base",
    "OutboxEntry",
    "ParentLink",
    "StartRecord",
    "Step",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("celery_stepped stores aware datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of the Stepped tables, with a constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class ParentLink(Base):
    """One thing a step waits on: a child action (``kind="action"``) or a wait.

    ``state`` is ``waiting`` until the member reports, then ``done`` (its outcome
    counted once), ``transferred`` (its action was superseded and the step now waits
    on the superseder) or ``released`` (the slot was given up without an outcome).
    """

    __tablename__ = "stepped_parent_links"

    id: Mapped[int] = mapped_column(primary_key=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("stepped_steps.id"), index=True)
    action_id: Mapped[int | None] = mapped_column(ForeignKey("stepped_actions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="action")
    state: Mapped[str] = mapped_column(String(16), default="waiting")
    outcome: Mapped[str | None] = mapped_column(String(32))
    call: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Action(Base):
    """A persisted action: a named piece of work on an actor, run through steps."""

    __tablename__ = "stepped_actions"
    __allow_unmapped__ = True
    #: A lane's actions by status: the action performing under a key is one index probe
    #: (an index on the status alone made it a scan of every performing action).
    __table_args__ = (Index("ix_stepped_actions_lane", "concurrency_key", "status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), index=True)
    actor_type: Mapped[str] = mapped_column(String(255))
    actor_id: Mapped[str] = mapped_column(String(255))
    arguments: Mapped[list[Any]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(32), default=ActionStatus.PENDING.value, index=True)
    root: Mapped[bool] = mapped_column(Boolean, default=False)
    outbound: Mapped[bool] = mapped_column(Boolean, default=False)
    concurrency_key: Mapped[str] = mapped_column(String(1024))
    checksum: Mapped[str | None] = mapped_column(String(64))
    checksum_key: Mapped[str] = mapped_column(String(1024))
    current_step_index: Mapped[int] = mapped_column(Integer, default=0)
    timeout_seconds: Mapped[float | None] = mapped_column(Float)
    job: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime | None] = mapped_column()
    completed_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    after_callbacks_succeeded_count: Mapped[int] = mapped_column(Integer, default=0)
    after_callbacks_failed_count: Mapped[int] = mapped_column(Integer, default=0)
    #: Comma-framed ids of the ancestors at creation (",3,7,"): the deadlock check.
    ancestry: Mapped[str] = mapped_column(Text, default=",")
    #: Idempotency key of the message that created a root action (its task id).
    request_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    #: Why the action failed when no step says so: ``{"type", "message", "traceback"}``.
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The action that superseded this one (``status == "superseded"``); its parent
    #: links wait on until the end of this chain of superseders is final (``join.py``).
    superseded_by_id: Mapped[int | None] = mapped_column(Integer, index=True)
    #: A root's Celery canvas (``link``, ``link_error``, ``chain``, ``chord``, group
    #: membership), applied when it is final (``celery_stepped.results``).
    canvas: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    steps: Mapped[list[Step]] = relationship(
        back_populates="action", order_by="Step.definition_index"
    )
    parent_steps: Mapped[list[Step]] = relationship(
        secondary="stepped_parent_links",
        primaryjoin="Action.id == ParentLink.action_id",
        secondaryjoin="ParentLink.step_id == Step.id",
        viewonly=True,
        order_by="Step.id",
    )

    #: Loads the actor from ``(actor_type, actor_id)``; set by Stepped on the actions it
    #: hands out (``get_action``, ``now``, hooks and callbacks).
    _load_actor: Callable[[str, str], Any] | None = None
    _short_circuit: str | None = None

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("arguments", [])
        kwargs.setdefault("status", ActionStatus.PENDING.value)
        kwargs.setdefault("after_callbacks_succeeded_count", 0)
        kwargs.setdefault("after_callbacks_failed_count", 0)
        kwargs.setdefault("current_step_index", 0)
        kwargs.setdefault("root", False)
        kwargs.setdefault("outbound", False)
        kwargs.setdefault("ancestry", ",")
        super().__init__(**kwargs)

    def cancel(self) -> None:
        """In ``before``: stop the action as ``cancelled`` without writing rows."""
        self._short_circuit = ActionStatus.CANCELLED.value
        self.status = ActionStatus.CANCELLED.value

    def complete(self) -> None:
        """In ``before``: finish the action as ``succeeded`` without running steps."""
        self._short_circuit = ActionStatus.SUCCEEDED.value
        self.status = ActionStatus.SUCCEEDED.value

    @property
    def completed(self) -> bool:
        """True once the action reached a final status."""
        return self.status in FINAL_STATUSES

    @property
    def actor(self) -> Any:
        """The actor this action runs on, loaded through the Stepped session."""
        if self._load_actor is None:
            raise ConfigurationError(
                f"action {self.id} was not loaded through Stepped: use stepped.get_action(id).actor"
            )
        return self._load_actor(self.actor_type, self.actor_id)

    def __repr__(self) -> str:
        return f"<Action {self.id} {self.name} {self.actor_type}/{self.actor_id} {self.status}>"


class Step(Base):
    """One step of an action: its body ran once, it completes when its members finish."""

    __tablename__ = "stepped_steps"
    __table_args__ = (UniqueConstraint("action_id", "definition_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    action_id: Mapped[int] = mapped_column(ForeignKey("stepped_actions.id"), index=True)
    definition_index: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32), default=StepStatus.PENDING.value)
    pending_actions_count: Mapped[int] = mapped_column(Integer, default=0)
    unsuccessful_actions_count: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column()
    completed_at: Mapped[datetime | None] = mapped_column()
    #: The exception that failed the body: ``{"type", "message", "traceback"}``.
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    action: Mapped[Action] = relationship(back_populates="steps")
    actions: Mapped[list[Action]] = relationship(
        secondary="stepped_parent_links",
        primaryjoin=lambda: and_(Step.id == ParentLink.step_id, ParentLink.action_id.is_not(None)),
        secondaryjoin=lambda: ParentLink.action_id == Action.id,
        viewonly=True,
        order_by=lambda: Action.id,
    )

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("status", StepStatus.PENDING.value)
        kwargs.setdefault("pending_actions_count", 0)
        kwargs.setdefault("unsuccessful_actions_count", 0)
        super().__init__(**kwargs)

    def __repr__(self) -> str:
        return f"<Step {self.id} action={self.action_id} #{self.definition_index} {self.status}>"


class OutboxEntry(Base):
    """A message a transition decided, written in the transition's transaction.

    Sent after the commit and deleted once sent; an entry a crash left behind is sent
    again by the next sweep (every message is idempotent).
    """

    __tablename__ = "stepped_outbox"

    id: Mapped[int] = mapped_column(primary_key=True)
    message: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The request a root's start message carries: the entry stays until that start
    #: runs (a broker that lost the message gets it again from the sweep).
    key: Mapped[str | None] = mapped_column(String(64), index=True)


class StartRecord(Base):
    """What ``before`` decided for one start message, keyed by its parent link or its
    request id, and written in the transaction that commits ``before``'s own changes:
    a start delivered again replays it instead of running ``before`` a second time."""

    __tablename__ = "stepped_starts"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(100), unique=True)
    outcome: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Achievement(Base):
    """The checksum of the last successful action under a ``checksum_key``."""

    __tablename__ = "stepped_achievements"

    id: Mapped[int] = mapped_column(primary_key=True)
    checksum_key: Mapped[str] = mapped_column(String(1024), unique=True)
    checksum: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


#: The tables, for the prebuilt Core statements of the hot paths (no ORM work per run).
ACTIONS = cast(Table, Action.__table__)
STEPS = cast(Table, Step.__table__)
LINKS = cast(Table, ParentLink.__table__)


def action_of_row(row: dict[str, Any]) -> Action:
    """An action built from its row's columns as a query's load builds one: a new
    instance with its columns in its dict, without ``__init__`` or attribute events
    (``Action(**row)`` cost 3.5% of a one-step child's instructions). The mappers are
    configured first when nothing did yet (a worker process whose first read was Core):
    an unconfigured attribute has no implementation to set through."""
    if not Action.__mapper__.configured:
        configure_mappers()
    action = cast(Action, Action.__mapper__.class_manager.new_instance())
    action.__dict__.update(row)
    return action
