"""Every Redis key template of celery_stepped, in one place.

Every key carries the namespace of the Stepped instance that owns it, so several apps
can share one Redis database: ``stepped:<namespace>:{<lane key>}:<part>``. Each lane's
keys share the hash tag ``{<lane key>}`` so a Lua script that touches one lane works on
Redis Cluster. A namespace may hold any character but ``{`` and ``}``: the first ``{``
of a key then always opens the lane key, so no two (namespace, lane key) pairs share a
key, and a namespace's SCAN pattern never matches another namespace's keys.
"""

from __future__ import annotations

from .errors import ConfigurationError

PREFIX = "stepped"
#: Every key of one lane: ``stepped:<namespace>:{<lane key>}``, then a part.
LANE = PREFIX + ":{namespace}:{{{key}}}"
#: Hash of one lane: ``current`` (action id), ``checksum`` (of current), ``seq``,
#: ``cs:<id>`` (checksum of a pending action).
LANE_STATE = LANE + ":state"
#: Sorted set of one lane's pending action ids, scored by the lane's sequence (FIFO).
LANE_PENDING = LANE + ":pending"
#: Lock of one lane (a redis-py ``Lock``: random token, expiry), held by a join while
#: it supersedes the lane's pending actions in SQL and then removes them in Redis.
LANE_LOCK = LANE + ":lock"

#: Characters that mean something in a Redis glob pattern (``\\`` escapes the next one).
GLOB_SPECIAL = frozenset("\\*?[]")


def check_namespace(namespace: str) -> str:
    """``namespace`` if it can name keys; raises ConfigurationError otherwise."""
    if not namespace or "{" in namespace or "}" in namespace:
        raise ConfigurationError(
            f"invalid Stepped namespace {namespace!r}: it must be non-empty, without '{{' or '}}'"
        )
    return namespace


def lane_state(namespace: str, key: str) -> str:
    """Key of the lane's state hash."""
    return LANE_STATE.format(namespace=namespace, key=key)


def lane_pending(namespace: str, key: str) -> str:
    """Key of the lane's pending sorted set."""
    return LANE_PENDING.format(namespace=namespace, key=key)


def lane_lock(namespace: str, key: str) -> str:
    """Key of the lane's lock."""
    return LANE_LOCK.format(namespace=namespace, key=key)


def escape_glob(text: str) -> str:
    """``text`` as a Redis glob pattern matching exactly itself."""
    return "".join("\\" + c if c in GLOB_SPECIAL else c for c in text)


def _lane_start(namespace: str) -> str:
    """What every key of the namespace's lanes starts with: ``stepped:<namespace>:{``."""
    return f"{PREFIX}:{namespace}:{{"


def lane_state_pattern(namespace: str) -> str:
    """SCAN pattern matching the state hash of every lane in ``namespace``, and nothing else."""
    return escape_glob(_lane_start(namespace)) + "*}:state"


def namespace_pattern(namespace: str) -> str:
    """SCAN pattern matching every lane key (state, pending, lock) of ``namespace``."""
    return escape_glob(_lane_start(namespace)) + "*"


def lane_key_from_state(namespace: str, redis_key: str) -> str:
    """The lane key inside a state key of ``namespace`` (as matched by its pattern)."""
    start, end = _lane_start(namespace), "}:state"
    if not (redis_key.startswith(start) and redis_key.endswith(end)):
        raise ValueError(f"{redis_key!r} is not a lane state key of namespace {namespace!r}")
    return redis_key[len(start) : -len(end)]
