"""Namespaces: two apps on one Redis database never see or touch each other's lanes.

Every test runs against a real Redis server and real SQL. The second instance's
namespace starts with the run's id, so the run deletes its keys like its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_stepped import ConfigurationError, Stepped, keys
from celery_stepped.lanes import Lane, LaneOutcome, Lanes
from tests.conftest import make_car, reset_database
from tests.isolation import RUN, delete_owned
from tests.models import Car

OTHER = f"{RUN}-other"
#: Namespaces that are glob patterns matching each other's keys unless escaped.
GLOBS = [f"{RUN}-*", f"{RUN}-?", f"{RUN}-[ab]", f"{RUN}-a", f"{RUN}-\\", f"{RUN}-a:b"]
#: Lane keys with glob characters, braces and colons.
LANE_KEYS = ["lane*", "lane?", "lane[1]", "lane1", "x}:{y", "a:b\\"]


@pytest.fixture
def other(redis_url: str, tmp_path: Path) -> Iterator[Stepped]:
    """A second app on the same Redis database: its own namespace, broker keys and SQL."""
    app = Celery("other", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"{OTHER}:broker:"}
    instance = Stepped(
        app, database_url=f"sqlite:///{tmp_path / 'other.db'}", redis_url=redis_url, namespace=OTHER
    )
    delete_owned(instance.redis, OTHER)
    reset_database(instance)
    yield instance
    delete_owned(instance.redis, OTHER)
    instance.redis.close()
    instance.engine.dispose()


def define_booth(stepped: Stepped) -> Any:
    """An outbound ``paint`` sharing one lane (``booth``) for all cars of the instance."""
    paint = stepped.app.stepped_action("paint", actor=Car, outbound=True, concurrency_key="booth")

    @paint.step
    def spray(step: Any, car: Car) -> None:
        car.note("sprayed")

    return paint


def snapshot(stepped: Stepped) -> dict[str, Any]:
    """Every Redis key of the instance's namespace with its content."""
    found: dict[str, Any] = {}
    for raw in stepped.redis.scan_iter(match=keys.namespace_pattern(stepped.namespace)):
        kind = stepped.redis.type(raw)
        if kind == b"hash":
            found[raw.decode()] = stepped.redis.hgetall(raw)
        elif kind == b"zset":
            found[raw.decode()] = stepped.redis.zrange(raw, 0, -1, withscores=True)
        else:
            found[raw.decode()] = stepped.redis.get(raw)
    return found


# -- key format ----------------------------------------------------------------------------


def test_keys_carry_the_namespace_and_keep_the_lane_key_as_hash_tag() -> None:
    assert keys.lane_state("garage", "Car/1/paint") == "stepped:garage:{Car/1/paint}:state"
    assert keys.lane_pending("garage", "booth") == "stepped:garage:{booth}:pending"
    assert keys.lane_lock("shop", "booth") == "stepped:shop:{booth}:lock"
    assert keys.escape_glob("a*b?[c]\\d") == "a\\*b\\?\\[c\\]\\\\d"
    assert keys.lane_state_pattern("g*") == "stepped:g\\*:{*}:state"
    assert keys.lane_key_from_state("g*", "stepped:g*:{x}:{y}:state") == "x}:{y"
    with pytest.raises(ValueError, match="not a lane state key"):
        keys.lane_key_from_state("g", "stepped:h:{x}:state")


@pytest.mark.parametrize("namespace", ["", "a{b", "a}b", "{}"])
def test_a_namespace_that_cannot_name_keys_is_refused(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with pytest.raises(ConfigurationError, match="namespace"):
        Lanes(client, namespace)
    client.close()


def test_the_namespace_defaults_to_the_app_name(redis_url: str, tmp_path: Path) -> None:
    def make(app: Celery, **options: Any) -> str:
        instance = Stepped(
            app, database_url=f"sqlite:///{tmp_path}/n.db", redis_url=redis_url, **options
        )
        instance.redis.close()
        instance.engine.dispose()
        assert instance.lanes.namespace == instance.namespace
        return instance.namespace

    assert make(Celery("garage", set_as_current=False)) == "garage"
    assert make(Celery(set_as_current=False)) == "celery"
    assert make(Celery("garage", set_as_current=False), namespace="fleet") == "fleet"
    configured = Celery("garage", set_as_current=False)
    configured.conf.stepped_namespace = "depot"
    assert make(configured) == "depot"
    with pytest.raises(ConfigurationError, match="namespace"):
        make(Celery("garage", set_as_current=False), namespace="bad{name}")


def test_lane_outcomes_are_an_enum_that_compares_as_text(stepped: Stepped) -> None:
    lanes = stepped.lanes
    first = lanes.join("K", 1, None, ",")
    assert first.outcome is LaneOutcome.PERFORM and first.outcome == "perform"
    assert lanes.join("K", 2, None, ",").outcome is LaneOutcome.QUEUED
    assert lanes.join("K", 3, None, ",").outcome is LaneOutcome.RETRY
    assert lanes.join("K", 9, None, ",1,").outcome is LaneOutcome.DEADLOCK
    assert lanes.release("K", 2) == (LaneOutcome.OTHER, 1)
    outcome, promoted = lanes.release("K", 1)
    assert (outcome, promoted) == ("next", 2) and outcome is LaneOutcome.NEXT
    assert lanes.release("K", 2)[0] is LaneOutcome.EMPTY
    assert lanes.release("K", 2) == (LaneOutcome.ABSENT, None)


# -- two instances on one Redis database ---------------------------------------------------


def test_lanes_of_one_namespace_are_invisible_to_another(stepped: Stepped, other: Stepped) -> None:
    mine, theirs = stepped.lanes, other.lanes
    mine.join("booth", 1, None, ",")
    mine.join("booth", 2, None, ",")
    mine.join("mine-only", 3, None, ",")
    theirs.join("booth", 7, None, ",")
    theirs.join("theirs-only", 8, None, ",")

    assert mine.keys() == ["booth", "mine-only"] and mine.count() == 2
    assert theirs.keys() == ["booth", "theirs-only"] and theirs.count() == 2
    assert mine.get("booth") == Lane("booth", 1, [2])
    assert theirs.get("booth") == Lane("booth", 7, [])
    assert theirs.get("mine-only") is None and mine.get("theirs-only") is None
    assert [lane.current_id for lane in theirs.all()] == [7, 8]
    assert all(k.startswith(f"stepped:{OTHER}:{{") for k in snapshot(other))

    # the same lane key moves independently in each namespace
    assert theirs.release("booth", 7) == (LaneOutcome.EMPTY, None)
    assert mine.get("booth") == Lane("booth", 1, [2])

    before = snapshot(other)
    mine.clear()
    assert mine.keys() == [] and snapshot(stepped) == {}
    assert snapshot(other) == before and theirs.keys() == ["theirs-only"]


def test_a_repair_leaves_the_other_namespaces_lanes_alone(stepped: Stepped, other: Stepped) -> None:
    apps = (stepped, other)
    paints = [define_booth(instance) for instance in apps]
    with stepped.capture(), other.capture():  # a current and a pending paint in each app
        pairs = [
            (paint.now(make_car(instance)), paint.now(make_car(instance)))
            for paint, instance in zip(paints, apps, strict=True)
        ]
    expected = [Lane("booth", held.id, [waiting.id]) for held, waiting in pairs]
    assert [stepped.lanes.get("booth"), other.lanes.get("booth")] == expected
    theirs = snapshot(other)
    assert theirs and stepped.repair().lines == [] and other.repair().lines == []

    stepped.lanes.clear()  # Redis lost this app's lanes, and only them
    assert stepped.lanes.count() == 0 and snapshot(other) == theirs
    with stepped.capture():
        report = stepped.repair(apply=True)
    held, waiting = pairs[0]
    assert report.lines == [f"lane 'booth': missing -> current {held.id}, pending {waiting.id}"]
    assert stepped.lanes.get("booth") == expected[0]
    assert snapshot(other) == theirs and other.repair().lines == []


def test_namespaces_and_lane_keys_with_glob_characters(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    every = {namespace: Lanes(client, namespace) for namespace in GLOBS}
    try:
        for n, lanes in enumerate(every.values()):
            for m, key in enumerate(LANE_KEYS):
                lanes.join(key, 100 * n + m, None, ",")
        for n, (namespace, lanes) in enumerate(every.items()):
            assert lanes.keys() == sorted(LANE_KEYS), namespace
            assert lanes.count() == len(LANE_KEYS)
            assert lanes.get("lane*") == Lane("lane*", 100 * n, [])
            assert lanes.get("lane?") == Lane("lane?", 100 * n + 1, [])
            assert lanes.get("lane") is None and lanes.get("lane[1") is None
        every[f"{RUN}-*"].clear()
        every[f"{RUN}-a"].clear()
        left = {namespace: lanes.count() for namespace, lanes in every.items()}
        assert left == {ns: 0 if ns in (f"{RUN}-*", f"{RUN}-a") else len(LANE_KEYS) for ns in GLOBS}
    finally:
        for lanes in every.values():
            lanes.clear()
        client.close()
