"""Starting an action: ``before``, keys and checksum, reuse, the pending row.

The engine calls these in order for a ``stepped.start`` message (or ``now()``):
:meth:`Starter.existing` finds the action a redelivered message already created;
:meth:`Starter.prepare` runs ``before`` and computes keys, timeout and checksum
(``ShortCircuit`` ends it there: cancelled, completed, failed or achieved, and no
action row is written; what keys and ``before`` decided is recorded as a
:mod:`~celery_stepped.start_records` record with ``before``'s changes, so a start
message delivered twice runs ``before`` once); :meth:`Starter.share` attaches the
caller to an identical action already performing; :meth:`Starter.create` writes the
pending row and claims the parent link in one transaction. Entering the lane is the
next transition (:mod:`celery_stepped.superseding`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from sqlalchemy import CursorResult, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .action_keys import (
    checksum_digest,
    key_from_parts,
    keys_of,
    needs_actor,
    tenancy,
    timeout_seconds,
)
from .effects import Effects
from .join import changed, performing_under, report_link, waits_on
from .messages import StartCall
from .models import ACTIONS as _ACTIONS
from .models import LINKS as _LINKS
from .models import Achievement, Action, ParentLink, Step, action_of_row
from .start_records import add_record, ended_in_before, outcome_of, recorded, replay
from .statuses import ActionStatus, LinkState
from .transition import Transition

if TYPE_CHECKING:
    from .definition import SteppedAction

__all__ = ["ShortCircuit", "Starter", "checksum_digest", "key_from_parts", "timeout_seconds"]

#: ``Starter.existing`` for a link that was counted without an action (never persisted).
FINISHED_WITHOUT_ROW = -1


def placeholder(action_id: int) -> Action:
    """The action a start call found (the caller reloads it by id when it needs more)."""
    if action_id == FINISHED_WITHOUT_ROW:
        return Action(name="", actor_type="", actor_id="", status="succeeded")
    action = Action(name="", actor_type="", actor_id="")
    action.id = action_id
    return action


def _call_before(hook: Callable[..., Any], action: Action, actor: Any) -> None:
    hook(action, actor, *action.arguments)


class ShortCircuit(Exception):
    """The action ends before it is persisted, with ``status``."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def _tenancy(call: StartCall) -> str:
    return tenancy(call.actor[0], call.actor[1], call.name)


#: Give a parent link its action, once (built once: Core; ``updated_at`` by onupdate).
_CLAIM_LINK = (
    update(_LINKS)
    .where(
        _LINKS.c.id == bindparam("link_id"),
        _LINKS.c.action_id.is_(None),
        _LINKS.c.state == LinkState.WAITING.value,
    )
    .values(action_id=bindparam("claimer"))
)
_LINK = select(_LINKS.c.state, _LINKS.c.action_id, _LINKS.c.call).where(
    _LINKS.c.id == bindparam("link_id")
)


_LANE_OTHER = _ACTIONS.alias("lane_other")


def _lane_performer(key: Any) -> Any:
    """The oldest action performing under ``key``, as the column ``lane_performer``."""
    return performing_under(_LANE_OTHER, key).scalar_subquery().label("lane_performer")


#: The oldest action performing in the new action's lane (``b_lane_key``).
_LANE_PERFORMER = _lane_performer(bindparam("b_lane_key"))

#: A child's pending row as its parent step wrote it (``child_rows``), with the action
#: performing in its lane: what ``_INSERT_ACTION`` gives a new action.
_WRITTEN = select(*_ACTIONS.c, _lane_performer(_ACTIONS.c.concurrency_key)).where(
    _ACTIONS.c.id == bindparam("action_id")
)

#: The pending row of a new action (Core: the object stays out of any session); every
#: column comes back, defaults included, so the object is the row as written. It also
#: returns the action performing in its lane, if any: lane entry rebuilds a lane Redis
#: lost only when SQL has one (:meth:`~celery_stepped.superseding.LaneEntry.enter`).
_INSERT_ACTION = insert(_ACTIONS).returning(*_ACTIONS.c, _LANE_PERFORMER)


class Created(NamedTuple):
    """The pending row :meth:`Starter.create` wrote, and whether no other action was
    performing in its lane in SQL when it was written (``lane_clear``)."""

    action: Action
    lane_clear: bool


def _row_of(action: Action) -> dict[str, Any]:
    """The columns the start gave ``action`` (unset ones take their defaults)."""
    state = action.__dict__
    return {c.key: state[c.key] for c in _ACTIONS.columns if state.get(c.key) is not None}


def _claim_link(s: Session, link_id: int, action_id: int) -> bool:
    """Give a parent link its action (once: a second delivery finds it claimed)."""
    claimed = s.execute(_CLAIM_LINK, {"link_id": link_id, "claimer": action_id})
    return bool(cast(CursorResult[Any], claimed).rowcount)


def _parent_waits_on(s: Session, link_id: int, candidate: int) -> bool:
    """True when ``candidate`` is the parent of ``link_id``'s step or waits on it."""
    parent = s.scalar(
        select(Step.action_id)
        .join(ParentLink, ParentLink.step_id == Step.id)
        .where(ParentLink.id == link_id)
    )
    return parent == candidate or (parent is not None and waits_on(s, parent, candidate))


def ancestry_of(s: Session, link_id: int) -> str:
    """Ancestry of a child started through ``link_id``: one query at any depth."""
    parent = s.execute(
        select(Action.id, Action.ancestry)
        .join(Step, Step.action_id == Action.id)
        .join(ParentLink, ParentLink.step_id == Step.id)
        .where(ParentLink.id == link_id)
    ).one()
    return f"{parent.ancestry}{parent.id},"


def _skip_if_achieved(s: Session, action: Action) -> None:
    """Raise ShortCircuit(succeeded) when identical work already succeeded."""
    if action.checksum is not None and action.checksum == s.scalar(
        select(Achievement.checksum).where(Achievement.checksum_key == action.checksum_key)
    ):
        raise ShortCircuit(ActionStatus.SUCCEEDED.value)


class Starter(Transition):
    """The start transition of one Stepped instance."""

    def existing(self, call: StartCall) -> int | None:
        """The action a earlier delivery of ``call`` created (or ``FINISHED_WITHOUT_ROW``)."""
        with self.session_factory() as s:
            if call.link is not None:
                link = s.execute(_LINK, {"link_id": call.link}).first()
                if link is None:
                    raise LookupError(f"unknown parent link {call.link}")
                if link.state != LinkState.WAITING and link.action_id is None:
                    return FINISHED_WITHOUT_ROW
                call.ancestry = (link.call or {}).get("ancestry")
                return link.action_id
            if call.request is not None:
                return s.scalar(select(Action.id).where(Action.request_id == call.request))
        return None

    def transient(
        self, definition: SteppedAction[Any], call: StartCall, root: bool, status: str
    ) -> Action:
        """An unpersisted action for ``call`` (``before`` sees it; short circuits return it)."""
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
        action._load_actor = self.actors.load_ref
        if ActionStatus(status).is_final:
            action.completed_at = self.clock()
        return action

    def prepare(self, definition: SteppedAction[Any], call: StartCall, root: bool) -> Action:
        """Keys and timeout, ``before``, then the checksum; raise ShortCircuit to stop.

        Keys and ``before`` run once per start: what they decided is recorded with
        ``before``'s own changes, and a delivery of the same message replays it.
        """
        if not needs_actor(definition):  # plain keys, no hooks: no query, no transaction
            action = self.transient(definition, call, root, ActionStatus.PENDING.value)
            self._keys(definition, action, None, call.args)
            return action
        if (call.link is not None or call.request is None) and not definition.before_hooks():
            return self._prepare_unrecorded(definition, call, root)
        with self.session_factory() as s:
            actor = self.actors.load_ref(call.actor[0], call.actor[1], s)
            action = self.transient(definition, call, root, ActionStatus.PENDING.value)
            outcome = recorded(s, call) or self._first_run(s, definition, call, action, actor)
            ended = replay(action, outcome)
            if ended is not None:
                raise ShortCircuit(ended)
            call.args = action.arguments
            loaded = self.actors.load(action.arguments, s)
            self._guarded(s, lambda: self._checksum(definition, action, actor, loaded), "keys")
            _skip_if_achieved(s, action)
        return action

    def _prepare_unrecorded(
        self, definition: SteppedAction[Any], call: StartCall, root: bool
    ) -> Action:
        """A child or a ``now()`` without ``before``: keys and checksum, no start record,
        no commit.

        Nothing is written before the pending row, so there is nothing to replay: a
        child's delivery that ends here (a key block failed) reports its parent link,
        and a later delivery then finds the link done (``existing``); one that dies
        before ``create`` left no trace, and the next delivery computes the keys afresh.
        A ``now()`` is never delivered twice.
        """
        with self.session_factory() as s:
            actor = call.given_actor
            if actor is None:
                actor = call.loaded_actor = self.actors.load_ref(call.actor[0], call.actor[1], s)
            action = self.transient(definition, call, root, ActionStatus.PENDING.value)
            args = self.actors.load(call.args, s)
            self._guarded(s, lambda: self._keys(definition, action, actor, args), "keys")
            self._guarded(s, lambda: self._checksum(definition, action, actor, args), "keys")
            _skip_if_achieved(s, action)
        return action

    def _first_run(
        self,
        s: Session,
        definition: SteppedAction[Any],
        call: StartCall,
        action: Action,
        actor: Any,
    ) -> dict[str, Any]:
        """Run keys and ``before``; commit their changes with the record of the outcome.

        A delivery running at the same time loses on the record's unique key: its
        changes roll back and it takes the winner's outcome.
        """
        args = self.actors.load(call.args, s)
        action.arguments = args
        try:
            self._guarded(s, lambda: self._keys(definition, action, actor, args), "keys")
            self._run_before(s, definition, action, actor)
            ended = ended_in_before(action)
        except ShortCircuit as short:  # a handled exception, rolled back already
            ended = short.status
        arguments = [] if ended else self.actors.dump(list(action.arguments))
        outcome = outcome_of(action, ended, arguments)
        add_record(s, call, outcome, self.clock())
        try:
            s.commit()  # before's changes are kept, also when it stops the action
        except IntegrityError:
            s.rollback()
            earlier = recorded(s, call)
            if earlier is None:
                raise  # not a record of the same start: the changes broke a constraint
            return earlier
        return outcome

    def _guarded(self, s: Session, block: Callable[[], None], name: str) -> None:
        """Run a user block; a handled exception fails the action (nothing written)."""
        try:
            block()
        except Exception as exc:
            s.rollback()
            self.events.report_or_raise(exc, None, None, name)
            raise ShortCircuit(ActionStatus.FAILED.value) from exc

    def _run_before(
        self, s: Session, definition: SteppedAction[Any], action: Action, actor: Any
    ) -> None:
        for hook in definition.before_hooks():
            self._guarded(s, partial(_call_before, hook, action, actor), "before")
            if ended_in_before(action) is not None:
                break

    @staticmethod
    def _keys(definition: SteppedAction[Any], action: Action, actor: Any, args: list[Any]) -> None:
        """Concurrency key, checksum key and timeout: from the arguments as given."""
        for column, value in keys_of(definition, actor, args, action.concurrency_key).items():
            setattr(action, column, value)

    @staticmethod
    def _checksum(
        definition: SteppedAction[Any], action: Action, actor: Any, args: list[Any]
    ) -> None:
        """The checksum: after ``before``, so it sees the arguments changed there."""
        checksum_fn = definition.resolved("checksum_fn")
        if checksum_fn is not None:
            value = checksum_fn(actor, *args)
            action.checksum = None if value is None else checksum_digest(value)

    def share(self, action: Action, call: StartCall) -> int | None:
        """Attach the caller to identical work in the lane (same checksum key and checksum,
        performing or pending); the id of the action it now waits on."""
        lane = self.lanes.checksums(action.concurrency_key)
        for candidate in [i for i, checksum in lane if checksum == action.checksum]:
            shared = self._attach(candidate, action, call)
            if shared is not None:
                return shared
        return None

    def _attach(self, candidate: int, action: Action, call: StartCall) -> int | None:
        with self.session_factory() as s:
            if call.link is not None and _parent_waits_on(s, call.link, candidate):
                return None  # attaching to an ancestor would wait forever: join, deadlock
            locked = changed(
                s,
                update(Action)
                .where(
                    Action.id == candidate,
                    Action.status.in_((ActionStatus.PENDING.value, ActionStatus.PERFORMING.value)),
                    Action.checksum == action.checksum,
                    Action.checksum_key == action.checksum_key,
                )
                .values(updated_at=self.clock()),
            )
            if not locked:
                return None
            if call.link is not None and not _claim_link(s, call.link, candidate):
                s.rollback()
                return self.existing(call) or FINISHED_WITHOUT_ROW
            s.commit()
        return candidate

    def create(self, action: Action, call: StartCall) -> Created | None:
        """Write the pending row (and claim the parent link); None when another
        delivery of the same message was first."""
        with self.session_factory() as s:
            if call.link is not None:
                action.ancestry = call.ancestry or ancestry_of(s, call.link)
            action.request_id = call.request if call.link is None else None
            action.canvas = call.canvas or None
            action.created_at = action.updated_at = self.clock()
            try:
                params = {**_row_of(action), "b_lane_key": action.concurrency_key}
                written = dict(s.execute(_INSERT_ACTION, params).one()._mapping)
                lane_clear = written.pop("lane_performer") is None
                for column, value in written.items():
                    setattr(action, column, value)
            except IntegrityError:
                s.rollback()
                return None
            if call.link is not None and not _claim_link(s, call.link, action.id):
                s.rollback()
                return None
            s.commit()
        return Created(action, lane_clear)

    def written(self, action_id: int) -> Created | None:
        """The row of a child its parent step wrote (:mod:`~celery_stepped.child_rows`)
        while it is pending, read as :meth:`create` would have written it; None when it
        is no longer pending (an earlier delivery, repair or healing moved it on)."""
        with self.session_factory() as s:
            row = s.execute(_WRITTEN, {"action_id": action_id}).first()
        if row is None or row.status != ActionStatus.PENDING.value:
            return None
        values = dict(row._mapping)
        lane_clear = values.pop("lane_performer") is None
        action = action_of_row(values)
        action._load_actor = self.actors.load_ref
        return Created(action, lane_clear)

    def finish_link(self, call: StartCall, status: str) -> Effects:
        """A child that never persisted reports its outcome to the parent step."""
        if call.link is None:
            return Effects()
        successful = status == ActionStatus.SUCCEEDED.value
        return report_link(self.session_factory, call.link, status, successful, self.clock())
