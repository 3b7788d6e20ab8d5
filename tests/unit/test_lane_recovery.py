"""Lanes after faults (issue 15): a lane lock whose holder died, a lane Redis lost while
its action performs, and repair running beside live joins and completions.

Real Redis and SQL; a fault is injected by deleting the lane's keys (what a Redis
restart without persistence does to them) or by holding a lock nobody releases.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import select

from celery_stepped import Stepped, lanes
from celery_stepped.lanes import Lane, LaneOutcome
from celery_stepped.models import Action
from celery_stepped.testing import perform_stepped_actions
from tests.conftest import make_car, stored_actions
from tests.models import Car
from tests.unit.test_lanes import SHOP, define_shop, lane_key, redis_keys, status, succeed_outbound


def lose_lane(stepped: Stepped, key: str) -> None:
    """Redis loses the lane (its state and pending keys), as after a restart."""
    stepped.redis.delete(lane_key(stepped, key, "state"), lane_key(stepped, key, "pending"))


def test_a_join_waits_for_a_dead_holders_lane_lock_no_longer_than_its_expiry(
    stepped: Stepped,
) -> None:
    """A worker killed while holding a lane lock (it never releases it) delays the lane's
    next superseding join until the lock expires, well within a redelivery; the join
    then supersedes as usual."""
    assert lanes.LOCK_TIMEOUT < lanes.LOCK_WAIT <= 10
    stepped.lanes.join("K", 1, None, ",")
    stepped.lanes.join("K", 2, None, ",")  # pending behind 1
    dead = stepped.lanes.lock("K")
    assert dead.acquire(blocking=False)  # ... and its holder is killed (-9)
    superseded: list[list[int]] = []
    outcome: list[Any] = []
    joining = threading.Thread(
        target=lambda: outcome.append(stepped.lanes.enter("K", 3, None, ",", superseded.append))
    )
    joining.start()
    joining.join(lanes.LOCK_WAIT + 10)  # a deadline for waiting, not a measurement
    assert not joining.is_alive()
    assert (outcome[0].outcome, outcome[0].superseded, superseded) == ("queued", [2], [[2]])
    assert stepped.lanes.get("K") == Lane("K", 1, [3])
    assert not stepped.redis.exists(lane_key(stepped, "K", "lock"))  # expired, then released


def test_a_join_into_a_lane_redis_lost_waits_behind_the_action_performing_in_it(
    stepped: Stepped,
) -> None:
    car = make_car(stepped)
    shop = define_shop(stepped)
    with stepped.capture() as jobs:
        held = shop.hold.now(car)  # outbound: performs until completed from outside
        assert status(stepped, held.id) == "performing"
        lose_lane(stepped, SHOP)
        shop.paint.now(car, 1)  # finds the lane missing: rebuilds it from SQL first
        (paint,) = stored_actions(stepped, "paint")
        assert paint.status == "pending"
        assert stepped.lanes.get(SHOP) == Lane(SHOP, held.id, [paint.id])
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)
    assert [status(stepped, i) for i in (held.id, paint.id)] == ["succeeded", "succeeded"]
    assert redis_keys(stepped) == []
    del jobs


def test_lane_recovery_leaves_a_lane_that_a_join_recreated_alone(stepped: Stepped) -> None:
    car = make_car(stepped)
    shop = define_shop(stepped)
    with stepped.capture():
        held = shop.hold.now(car)
        lose_lane(stepped, SHOP)
        stepped.lanes.join(SHOP, 999, None, ",")  # someone recreated it meanwhile
        assert stepped.lanes.restore(SHOP, (held.id, None), None, only_if_missing=True) is False
        assert stepped.lanes.get(SHOP) == Lane(SHOP, 999, [])
        stepped.lanes.clear()


def pending_rows(stepped: Stepped, car: Car, key: str, count: int) -> list[int]:
    """``count`` pending ``paint`` actions in lane ``key`` that Redis does not know of
    (their lane was lost), oldest first."""
    with stepped.session() as s:
        rows = [
            Action(
                name="paint",
                actor_type="Car",
                actor_id=str(car.id),
                arguments=[n],
                concurrency_key=key,
                checksum_key=f"Car/{car.id}/paint",
            )
            for n in range(count)
        ]
        s.add_all(rows)
        s.flush()
        return [row.id for row in rows]


def test_repair_supersedes_older_pending_actions_when_no_action_performs(
    stepped: Stepped,
) -> None:
    car = make_car(stepped)
    define_shop(stepped)
    first, second, newest = pending_rows(stepped, car, SHOP, 3)
    with stepped.capture():
        report = stepped.repair(apply=True)
        assert stepped.lanes.get(SHOP) == Lane(SHOP, newest, [])
        assert [status(stepped, i) for i in (first, second)] == ["superseded", "superseded"]
        (lane,) = report.lanes
        assert (lane.current_id, lane.superseded, lane.superseder) == (
            newest,
            [first, second],
            newest,
        )
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)
    assert status(stepped, newest) == "succeeded"
    with stepped.session() as s:
        by = s.scalars(select(Action.superseded_by_id).where(Action.id.in_((first, second))))
        assert set(by) == {newest}
    assert redis_keys(stepped) == []


def test_repair_keeps_the_promoted_action_current_and_supersedes_older_ones(
    stepped: Stepped,
) -> None:
    """A release promoted an action that has not begun yet (pending in SQL): repair
    running now keeps it current, as the lane decided."""
    car = make_car(stepped)
    define_shop(stepped)
    older, promoted, newest = pending_rows(stepped, car, SHOP, 3)
    stepped.lanes.restore(SHOP, (promoted, None), (newest, None))
    with stepped.capture():
        report = stepped.repair(apply=True)
        assert stepped.lanes.get(SHOP) == Lane(SHOP, promoted, [newest])
        assert status(stepped, older) == "superseded"
        assert [lane.superseder for lane in report.lanes] == [newest]
        stepped.lanes.clear()


def test_repair_releases_a_lane_whose_restored_action_completed_meanwhile(
    stepped: Stepped, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repair read the lane's performing action from SQL; the action completed (and found
    no lane to release) before repair wrote the lane back. Repair must not leave it as
    the lane's current action, holding the lane forever."""
    car = make_car(stepped)
    shop = define_shop(stepped)
    with stepped.capture():
        held = shop.hold.now(car)
        lose_lane(stepped, SHOP)
        restore = stepped.lanes.restore

        def complete_first(key: str, *args: Any, **kwargs: Any) -> bool:
            if key == SHOP and status(stepped, held.id) == "performing":
                assert stepped.complete(held.id) is not None  # its release finds no lane
            return restore(key, *args, **kwargs)

        monkeypatch.setattr(stepped.lanes, "restore", complete_first)
        stepped.repair(apply=True)
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)
    assert status(stepped, held.id) == "succeeded"
    assert stepped.lanes.get(SHOP) is None
    assert redis_keys(stepped) == []


def test_repair_waits_for_the_lane_lock_of_a_live_join(stepped: Stepped) -> None:
    """Repair takes each lane's lock before it rewrites the lane (a join holds it while
    it supersedes), and gives it back."""
    car = make_car(stepped)
    define_shop(stepped)
    (pending,) = pending_rows(stepped, car, SHOP, 1)
    seen: list[bool] = []
    restore = stepped.lanes.restore

    def observe(key: str, *args: Any, **kwargs: Any) -> bool:
        seen.append(bool(stepped.redis.exists(lane_key(stepped, key, "lock"))))
        return restore(key, *args, **kwargs)

    stepped.lanes.restore = observe  # type: ignore[method-assign]
    with stepped.capture():
        stepped.repair(apply=True)
    assert seen == [True]
    assert not stepped.redis.exists(lane_key(stepped, SHOP, "lock"))
    assert stepped.lanes.get(SHOP) == Lane(SHOP, pending, [])
    assert stepped.lanes.release(SHOP, pending)[0] == LaneOutcome.EMPTY


def test_repair_resends_the_timeout_of_an_action_whose_lane_a_worker_rebuilt(
    stepped: Stepped,
) -> None:
    """Redis lost the lane and the broker the action's timeout; a join rebuilt the lane
    before repair ran, so Redis and SQL agree on it: repair still sends the timeout."""
    car = make_car(stepped)
    shop = define_shop(stepped)
    waiting = stepped.app.stepped_action(
        "waiting", actor=Car, outbound=True, timeout=60, concurrency_key=SHOP
    )

    @waiting.step
    def send(step: Any, car: Car) -> None:
        car.note("sent")

    with stepped.capture() as jobs:
        held = waiting.now(car)
        jobs.perform_all(only="action")
        lose_lane(stepped, SHOP)
        shop.paint.now(car, 1)  # rebuilds the lane: held is current again
        report = stepped.repair()
        (lane,) = report.lanes
        assert (lane.key, lane.recovered, lane.current_id) == (SHOP, True, held.id)
        assert ("stepped.timeout", held.id) in [(r.task, r.target) for r in report.resends]
        stepped.repair(apply=True)
        assert not stepped.lanes.recovered(SHOP)
        assert stepped.repair().lanes == []
        stepped.lanes.clear()
