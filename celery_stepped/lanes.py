"""Lanes: one performing action per concurrency key, the rest pending in FIFO order.

A lane is a Redis hash (current action, its checksum, a sequence) and a sorted set of
pending action ids scored by that sequence. Every transition is one Lua script call,
so it is atomic across any number of workers.

Joining a lane that already holds a pending action spans Redis and SQL: the older
pending actions must become ``superseded`` in SQL (their parent steps then wait on
the newcomer) and leave the sorted set. :meth:`Lanes.enter` does the SQL part first and
then removes them with a compare-and-set script, so a crash in between never loses a
superseded action (it stays in Redis, already superseded, until a join removes it or
the lane promotes and releases it). A Redis lock per lane (random token, expiry)
serialises these joins so they do not retry against each other; correctness does
not depend on the lock, only throughput does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from importlib import resources
from typing import Any
from uuid import uuid4

import redis
from redis.exceptions import LockError, RedisError
from redis.lock import Lock

from . import keys

__all__ = ["JoinResult", "Lane", "LaneOutcome", "Lanes"]

#: Seconds a lane lock lives unless released: a holder killed mid-join blocks the lane's
#: other joins this long at most, well under a broker's redelivery. The work done under
#: it is one short SQL transaction; should it take longer, the lock lapses and the
#: compare-and-set of ``join.lua`` still keeps the lane right.
LOCK_TIMEOUT = 5.0
#: Seconds a join waits for a lane lock before it goes on without it (longer than
#: :data:`LOCK_TIMEOUT`, so a dead holder's lock expires first).
LOCK_WAIT = 6.0
#: Seconds between two attempts to take a busy lane lock.
LOCK_POLL = 0.005
#: Keys deleted per DEL command when clearing a namespace.
DELETE_BATCH = 500


def _load_script(name: str) -> str:
    return resources.files("celery_stepped").joinpath(f"lua/{name}.lua").read_text("utf-8")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LaneOutcome(StrEnum):
    """What a lane script decided (the first word of its reply)."""

    #: Join: the action is the lane's current action and performs now.
    PERFORM = "perform"
    #: Join: the action waits in the lane (older pending actions left it).
    QUEUED = "queued"
    #: Join: the lane's current action is one of the joining action's ancestors.
    DEADLOCK = "deadlock"
    #: Join: pending actions must be superseded in SQL first; nothing changed.
    RETRY = "retry"
    #: Join (flag ``b``): another action is current; nothing changed.
    BUSY = "busy"
    #: Join (flag ``e``): the lane has no current action though SQL has one performing
    #: (Redis lost it); nothing changed.
    LOST = "lost"
    #: Release: the oldest pending action became current.
    NEXT = "next"
    #: Release: nothing waited; the lane is gone.
    EMPTY = "empty"
    #: Release: the released action was not current (another action is).
    OTHER = "other"
    #: Release: the lane does not exist.
    ABSENT = "absent"


@dataclass(frozen=True)
class Lane:
    """A snapshot of one lane."""

    key: str
    current_id: int | None
    pending_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class JoinResult:
    """What joining a lane decided.

    ``outcome`` is :attr:`LaneOutcome.PERFORM`, ``QUEUED``, ``DEADLOCK`` or (from
    :meth:`Lanes.join` only) ``RETRY``; ``superseded`` lists the pending actions
    this join removed from the lane (from :meth:`Lanes.enter`: those it had
    superseded; for ``RETRY``: the pending actions to supersede first);
    ``current_id`` is the lane's current action for a deadlock.
    """

    outcome: LaneOutcome
    superseded: list[int] = field(default_factory=list)
    current_id: int | None = None
    #: A ``RETRY`` that took the lane lock for the caller (``Lanes.join(lock=...)``).
    locked: bool = False


def _until_joined(
    joining: Callable[..., JoinResult],
    result: JoinResult,
    supersede: Callable[[list[int]], None],
    done: list[int],
    lock: tuple[str, str] | None,
) -> JoinResult:
    """Supersede what each ``RETRY`` lists (adding it to ``done``), then join again."""
    while result.outcome is LaneOutcome.RETRY:
        fresh = [i for i in result.superseded if i not in done]
        if fresh:
            supersede(fresh)
            done.extend(fresh)
        result = joining(done, lock=lock)
    return result


class Lanes:
    """The lanes of one Stepped instance, stored in Redis (``stepped.lanes``).

    Args:
        client: the Redis client of the lanes.
        namespace: the instance's namespace; every key of these lanes carries it, and
            :meth:`keys`, :meth:`count`, :meth:`all` and :meth:`clear` see no other.

    Raises:
        ConfigurationError: the namespace is empty or holds ``{`` or ``}``.
    """

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.redis = client
        self.namespace = keys.check_namespace(namespace)
        self._join = client.register_script(_load_script("join"))
        self._release = client.register_script(_load_script("release"))
        self._leave = client.register_script(_load_script("leave"))
        self._restore = client.register_script(_load_script("restore"))

    def _keys(self, key: str) -> list[str]:
        return [keys.lane_state(self.namespace, key), keys.lane_pending(self.namespace, key)]

    def join(
        self,
        key: str,
        action_id: int,
        checksum: str | None,
        ancestry: str,
        superseded: Iterable[int] = (),
        lock: tuple[str, str] | None = None,
        flags: str = "",
    ) -> JoinResult:
        """Join ``key``'s lane in one atomic step (idempotent for an action in it).

        Pending actions are removed only when they are among ``superseded`` (already
        superseded in SQL by the caller); otherwise nothing changes and the outcome
        is ``RETRY`` with the lane's pending actions. ``lock``: ``(token, "take")``
        takes the lane lock with a ``RETRY`` when it is free (``JoinResult.locked``);
        ``(token, "drop")`` releases it with any other outcome. ``flags`` (``join.lua``):
        ``b`` answers ``BUSY`` when another action is current, ``e`` answers ``LOST``
        when none is; both change nothing.
        """
        framed = "," + "".join(f"{i}," for i in superseded)
        token, verb = lock or ("", "")
        argv: list[Any] = [action_id, checksum or "", ancestry, framed, token]
        argv += [int(LOCK_TIMEOUT * 1000), verb, flags]
        lane_keys = [*self._keys(key), keys.lane_lock(self.namespace, key)]
        reply = [_text(v) for v in self._join(lane_keys, argv)]
        outcome = LaneOutcome(reply[0])
        if outcome in (LaneOutcome.DEADLOCK, LaneOutcome.BUSY):
            return JoinResult(outcome, current_id=int(reply[1]))
        locked = len(reply) > 1 and reply[1] == "locked"
        ids = reply[2:] if locked else reply[1:]
        return JoinResult(outcome, superseded=[int(v) for v in ids], locked=locked)

    def enter(
        self,
        key: str,
        action_id: int,
        checksum: str | None,
        ancestry: str,
        supersede: Callable[[list[int]], None],
        flags: str = "",
    ) -> JoinResult:
        """Join ``key``'s lane, calling ``supersede(ids)`` before pending actions leave it
        (``flags``: see :meth:`join`; ``BUSY`` and ``LOST`` come back as they are).

        ``supersede`` must mark those actions superseded in SQL, so that their parent
        steps wait on ``action_id`` (idempotently: an id may come again). It runs before
        the script removes them, under the lane's lock, and again for any pending
        action a concurrent join added meanwhile. A lane without pending actions
        costs one script call and no lock.
        """
        token = uuid4().hex
        result = self.join(key, action_id, checksum, ancestry, lock=(token, "take"), flags=flags)
        if result.outcome is not LaneOutcome.RETRY:
            return result
        done: list[int] = []
        joining = partial(self.join, key, action_id, checksum, ancestry)
        if result.locked:  # the script took the lock (and the last join drops it)
            try:
                result = _until_joined(joining, result, supersede, done, (token, "drop"))
            finally:
                if result.outcome is LaneOutcome.RETRY:  # an error: let the lock go
                    self._unlock(key, token)
        else:
            with self.locked(key):
                # Look again now that no other join runs: the pending action may differ.
                result = _until_joined(joining, joining(), supersede, done, None)
        return JoinResult(result.outcome, done, result.current_id)

    def _unlock(self, key: str, token: str) -> None:
        """Release the lane lock if ``token`` still holds it (best effort, on an error
        path: a Redis that cannot answer lets it expire, and the error that led here is
        the one raised)."""
        with suppress(LockError, RedisError):
            self.lock(key).do_release(token)

    def lock(self, key: str) -> Lock:
        """The lock of ``key``'s lane: a random token per holder, expiring on its own."""
        return self.redis.lock(
            keys.lane_lock(self.namespace, key),
            timeout=LOCK_TIMEOUT,
            sleep=LOCK_POLL,
            blocking_timeout=LOCK_WAIT,
            thread_local=False,
        )

    @contextmanager
    def locked(self, key: str) -> Iterator[bool]:
        """Hold the lane lock if it can be had in time; go on without it otherwise."""
        lock = self.lock(key)
        held = bool(lock.acquire())
        try:
            yield held
        finally:
            if held:
                # LockError: it expired (and another join may hold it now): not ours.
                with suppress(LockError):
                    lock.release()

    def release(self, key: str, action_id: int) -> tuple[LaneOutcome, int | None]:
        """Move the lane on after ``action_id`` completed.

        Returns ``(NEXT, id)`` for the promoted action, ``(OTHER, id)`` when
        ``action_id`` was not current (already released), ``(EMPTY, None)`` or
        ``(ABSENT, None)`` (outcomes of :class:`LaneOutcome`).
        """
        reply = [_text(v) for v in self._release(self._keys(key), [action_id])]
        return LaneOutcome(reply[0]), (int(reply[1]) if len(reply) > 1 else None)

    def leave(self, key: str, action_id: int) -> bool:
        """Remove a pending action from its lane; True if it was there."""
        return bool(self._leave(self._keys(key), [action_id]))

    def restore(
        self,
        key: str,
        current: tuple[int, str | None] | None,
        pending: tuple[int, str | None] | None,
        only_if_missing: bool = False,
    ) -> bool:
        """Overwrite one lane with the given current and pending action (repair); with
        ``only_if_missing``, only when the lane does not exist. True if it was written."""
        argv: list[Any] = [
            current[0] if current else "",
            (current[1] or "") if current else "",
            pending[0] if pending else "",
            (pending[1] or "") if pending else "",
            "1" if only_if_missing else "",
        ]
        return bool(self._restore(self._keys(key), argv))

    def recovered(self, key: str) -> bool:
        """Whether a worker rebuilt ``key``'s lane after Redis lost it (``restore`` with
        ``only_if_missing``) and no repair has rewritten it since."""
        return bool(self.redis.hexists(self._keys(key)[0], "recovered"))

    def exists(self, key: str) -> bool:
        """Whether ``key``'s lane exists in Redis (an action holds or waits in it)."""
        return bool(self.redis.exists(*self._keys(key)))

    def current_checksum(self, key: str) -> tuple[int | None, str | None]:
        """The lane's current action id and its checksum (either may be None)."""
        state = keys.lane_state(self.namespace, key)
        current, checksum = self.redis.hmget(state, ["current", "checksum"])
        return (
            int(_text(current)) if current is not None else None,
            _text(checksum) if checksum else None,
        )

    def checksums(self, key: str) -> list[tuple[int, str]]:
        """``(action id, checksum)`` of the lane's current action, then its pending ones,
        for those that have a checksum."""
        state = self.redis.hgetall(self._keys(key)[0])
        fields = {_text(k): _text(v) for k, v in state.items()}
        found = []
        if fields.get("current") and fields.get("checksum"):
            found.append((int(fields["current"]), fields["checksum"]))
        for name, value in fields.items():
            if name.startswith("cs:") and value:
                found.append((int(name[3:]), value))
        return found

    def get(self, key: str) -> Lane | None:
        """The lane of ``key``, or None when no action holds it."""
        pipe = self.redis.pipeline(transaction=True)
        state, pending_key = self._keys(key)
        pipe.hget(state, "current")
        pipe.zrange(pending_key, 0, -1)
        current, pending = pipe.execute()
        if current is None and not pending:
            return None
        return Lane(
            key=key,
            current_id=int(_text(current)) if current is not None else None,
            pending_ids=[int(_text(p)) for p in pending],
        )

    def keys(self) -> list[str]:
        """Every lane's concurrency key in this namespace, sorted."""
        pattern = keys.lane_state_pattern(self.namespace)
        found = {
            keys.lane_key_from_state(self.namespace, _text(k))
            for k in self.redis.scan_iter(match=pattern, count=500)
        }
        return sorted(found)

    def count(self) -> int:
        """How many lanes exist in this namespace."""
        return len(self.keys())

    def all(self) -> list[Lane]:
        """A snapshot of every lane in this namespace."""
        return [lane for lane in (self.get(k) for k in self.keys()) if lane is not None]

    def clear(self) -> None:
        """Delete every lane of this namespace, locks included (tests and repair).

        Other namespaces' keys, and anything else in the database, stay untouched.
        """
        batch: list[Any] = []
        for found in self.redis.scan_iter(match=keys.namespace_pattern(self.namespace), count=500):
            batch.append(found)
            if len(batch) >= DELETE_BATCH:
                self.redis.delete(*batch)
                batch.clear()
        if batch:
            self.redis.delete(*batch)
