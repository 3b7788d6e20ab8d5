"""Every Redis key template of celery_stepped, in one place.

Each lane's keys share the hash tag ``{<concurrency key>}`` so a Lua script that
touches one lane works on Redis Cluster.
"""

from __future__ import annotations

PREFIX = "stepped"
#: Hash of one lane: ``current`` (action id), ``checksum`` (of current), ``seq``,
#: ``cs:<id>`` (checksum of a pending action).
LANE_STATE = PREFIX + ":{{{key}}}:state"
#: Sorted set of one lane's pending action ids, scored by the lane's sequence (FIFO).
LANE_PENDING = PREFIX + ":{{{key}}}:pending"
#: Lock of one lane (a redis-py ``Lock``: random token, expiry), held by a join while
#: it supersedes the lane's pending actions in SQL and then removes them in Redis.
LANE_LOCK = PREFIX + ":{{{key}}}:lock"
#: SCAN pattern matching every lane's state hash.
LANE_STATE_PATTERN = PREFIX + ":{*}:state"


def lane_state(key: str) -> str:
    """Key of the lane's state hash."""
    return LANE_STATE.format(key=key)


def lane_pending(key: str) -> str:
    """Key of the lane's pending sorted set."""
    return LANE_PENDING.format(key=key)


def lane_lock(key: str) -> str:
    """Key of the lane's lock."""
    return LANE_LOCK.format(key=key)


def lane_key_from_state(redis_key: str) -> str:
    """The concurrency key inside a lane state key."""
    return redis_key[len(PREFIX) + 2 : -len("}:state")]
