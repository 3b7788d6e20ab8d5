"""Lanes: one performing action per concurrency key, the rest pending in FIFO order.

A lane is a Redis hash (current action, its checksum, a sequence) and a sorted set of
pending action ids scored by that sequence. Every transition is one Lua script call,
so it is atomic across any number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis

from . import keys

__all__ = ["JoinResult", "Lane", "Lanes"]


def _load_script(name: str) -> str:
    return resources.files("celery_stepped").joinpath(f"lua/{name}.lua").read_text("utf-8")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Lane:
    """A snapshot of one lane."""

    key: str
    current_id: int | None
    pending_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class JoinResult:
    """What joining a lane decided.

    ``outcome`` is ``"perform"``, ``"queued"`` or ``"deadlock"``; ``superseded`` lists
    the pending actions this join superseded; ``current_id`` is the lane's current
    action for a deadlock.
    """

    outcome: str
    superseded: list[int] = field(default_factory=list)
    current_id: int | None = None


class Lanes:
    """The lanes of one Stepped instance, stored in Redis (``stepped.lanes``)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._join = client.register_script(_load_script("join"))
        self._release = client.register_script(_load_script("release"))
        self._leave = client.register_script(_load_script("leave"))
        self._restore = client.register_script(_load_script("restore"))

    @staticmethod
    def _keys(key: str) -> list[str]:
        return [keys.lane_state(key), keys.lane_pending(key)]

    def join(self, key: str, action_id: int, checksum: str | None, ancestry: str) -> JoinResult:
        """Join ``key``'s lane atomically (idempotent for an action already in it)."""
        reply = [
            _text(v) for v in self._join(self._keys(key), [action_id, checksum or "", ancestry])
        ]
        if reply[0] == "deadlock":
            return JoinResult("deadlock", current_id=int(reply[1]))
        return JoinResult(reply[0], superseded=[int(v) for v in reply[1:]])

    def release(self, key: str, action_id: int) -> tuple[str, int | None]:
        """Move the lane on after ``action_id`` completed.

        Returns ``("next", id)`` for the promoted action, ``("other", id)`` when
        ``action_id`` was not current (already released), ``("empty", None)`` or
        ``("absent", None)``.
        """
        reply = [_text(v) for v in self._release(self._keys(key), [action_id])]
        return reply[0], (int(reply[1]) if len(reply) > 1 else None)

    def leave(self, key: str, action_id: int) -> bool:
        """Remove a pending action from its lane; True if it was there."""
        return bool(self._leave(self._keys(key), [action_id]))

    def restore(
        self,
        key: str,
        current: tuple[int, str | None] | None,
        pending: tuple[int, str | None] | None,
    ) -> None:
        """Overwrite one lane with the given current and pending action (repair)."""
        argv: list[Any] = [
            current[0] if current else "",
            (current[1] or "") if current else "",
            pending[0] if pending else "",
            (pending[1] or "") if pending else "",
        ]
        self._restore(self._keys(key), argv)

    def current_checksum(self, key: str) -> tuple[int | None, str | None]:
        """The lane's current action id and its checksum (either may be None)."""
        current, checksum = self.redis.hmget(keys.lane_state(key), ["current", "checksum"])
        return (
            int(_text(current)) if current is not None else None,
            _text(checksum) if checksum else None,
        )

    def get(self, key: str) -> Lane | None:
        """The lane of ``key``, or None when no action holds it."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hget(keys.lane_state(key), "current")
        pipe.zrange(keys.lane_pending(key), 0, -1)
        current, pending = pipe.execute()
        if current is None and not pending:
            return None
        return Lane(
            key=key,
            current_id=int(_text(current)) if current is not None else None,
            pending_ids=[int(_text(p)) for p in pending],
        )

    def keys(self) -> list[str]:
        """Every lane's concurrency key, sorted."""
        found = {
            keys.lane_key_from_state(_text(k))
            for k in self.redis.scan_iter(match=keys.LANE_STATE_PATTERN, count=500)
        }
        return sorted(found)

    def count(self) -> int:
        """How many lanes exist."""
        return len(self.keys())

    def all(self) -> list[Lane]:
        """A snapshot of every lane."""
        return [lane for lane in (self.get(k) for k in self.keys()) if lane is not None]

    def clear(self) -> None:
        """Delete every lane (tests and repair)."""
        for k in self.keys():
            self.redis.delete(*self._keys(k))
