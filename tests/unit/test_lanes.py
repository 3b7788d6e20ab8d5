"""Lanes on real Redis: concurrency keys, superseding, checksum reuse, deadlocks.

Every test runs against a real Redis server (embedded, or ``STEPPED_REDIS_URL``) and a
real database, inspects the lane keys in Redis directly and the rows in SQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from sqlalchemy import event, func, select, update

from celery_stepped import ActionStatus, Deadlock, Stepped, keys, lanes, signals
from celery_stepped.effects import Delivery
from celery_stepped.lanes import Lane, LaneOutcome
from celery_stepped.models import Achievement, Action, ParentLink, Step
from celery_stepped.starting import checksum_digest
from celery_stepped.testing import (
    handle_stepped_action_exceptions,
    perform_stepped_actions,
)
from tests.conftest import load_car, make_car, stored_actions
from tests.models import Car

SHOP = "Car/maintenance"


# -- helpers ------------------------------------------------------------------------------


def redis_keys(stepped: Stepped) -> list[str]:
    """Every key the instance holds in Redis (its namespace: other runs may share Redis)."""
    pattern = keys.namespace_pattern(stepped.namespace)
    return sorted(k.decode() for k in stepped.redis.scan_iter(match=pattern))


def lane_key(stepped: Stepped, lane: str, part: str) -> str:
    """The Redis key of one part (``state``, ``pending``, ``lock``) of a lane, as documented."""
    return f"stepped:{stepped.namespace}:{{{lane}}}:{part}"


def status(stepped: Stepped, action_id: int | None) -> str:
    assert action_id is not None
    return stepped.get_action(action_id).status


def links_of_step(stepped: Stepped, step_id: int) -> list[ParentLink]:
    with stepped.session() as s:
        found = list(
            s.scalars(
                select(ParentLink).where(ParentLink.step_id == step_id).order_by(ParentLink.id)
            ).all()
        )
        s.expunge_all()
    return found


def count(stepped: Stepped, model: Any) -> int:
    with stepped.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def succeed_outbound(action: Action) -> str:
    return ActionStatus.SUCCEEDED.value


@dataclass
class Shop:
    """One lane shared by several actions (``Car/maintenance``)."""

    hold: Any  # outbound, holds the lane until completed from outside
    paint: Any  # a plain action in the lane
    service: Any  # a parent with its own lane per ``n``: step.do(paint)


def define_shop(stepped: Stepped) -> Shop:
    app = stepped.app

    @app.stepped_action(outbound=True, concurrency_key=["Car", "maintenance"])
    def hold(car: Car) -> None:
        car.note("hold")

    paint = app.stepped_action("paint", actor=Car)

    @paint.concurrency_key
    def shop_key(car: Car, *args: Any) -> str:
        return SHOP

    @paint.step
    def coat(step: Any, car: Car, *args: Any) -> None:
        car.honk()

    service = app.stepped_action("service", actor=Car, concurrency_key=lambda car, n: f"svc/{n}")

    @service.step
    def order(step: Any, car: Car, n: int) -> None:
        step.do(paint, n)

    return Shop(hold, paint, service)


# -- concurrency keys -----------------------------------------------------------------------


def test_default_concurrency_key_is_the_tenancy_key(stepped: Stepped) -> None:
    app = stepped.app

    @app.stepped_action(outbound=True)
    def wash(car: Car) -> None:
        pass

    @app.stepped_action(outbound=True)
    def dry(car: Car) -> None:
        pass

    one, two = make_car(stepped), make_car(stepped)
    first = wash.now(one)
    second = wash.now(one)
    other_car = wash.now(two)
    other_name = dry.now(one)

    assert first.concurrency_key == f"Car/{one.id}/wash"
    assert (first.status, second.status) == ("performing", "pending")
    assert (other_car.status, other_name.status) == ("performing", "performing")
    assert stepped.lanes.get(f"Car/{one.id}/wash") == Lane(
        f"Car/{one.id}/wash", first.id, [second.id]
    )
    assert stepped.lanes.get(f"Car/{two.id}/wash") == Lane(f"Car/{two.id}/wash", other_car.id, [])
    expected = sorted([f"Car/{one.id}/wash", f"Car/{two.id}/wash", f"Car/{one.id}/dry"])
    assert stepped.lanes.keys() == expected
    assert stepped.lanes.count() == 3
    assert redis_keys(stepped) == sorted(
        [lane_key(stepped, f"Car/{one.id}/wash", "pending")]
        + [lane_key(stepped, k, "state") for k in expected]
    )


def test_concurrency_key_option_decorator_and_list_share_a_lane_across_actors_and_actions(
    stepped: Stepped,
) -> None:
    app = stepped.app

    @app.stepped_action(outbound=True, concurrency_key=["Car", "maintenance"])
    def recycle(car: Car) -> None:
        car.note("recycle")

    @app.stepped_action(outbound=True, concurrency_key="Car/maintenance")
    def tune(car: Car) -> None:
        car.note("tune")

    @app.stepped_action(outbound=True)
    def paint(car: Car) -> None:
        car.note("paint")

    @paint.concurrency_key
    def paint_key(car: Car) -> list[str]:
        return ["Car", "maintenance"]

    one, two = make_car(stepped), make_car(stepped)
    with stepped.capture() as jobs:
        recycled = recycle.now(one)
        painted = paint.now(two)
        assert {recycled.concurrency_key, painted.concurrency_key} == {SHOP}
        assert (recycled.status, painted.status) == ("performing", "pending")
        assert stepped.lanes.keys() == [SHOP]
        assert stepped.lanes.get(SHOP) == Lane(SHOP, recycled.id, [painted.id])

        stepped.complete(recycled.id)
        assert jobs.enqueued[0].name == "paint"
        jobs.perform_all()
        assert status(stepped, painted.id) == "performing"
        assert stepped.lanes.get(SHOP) == Lane(SHOP, painted.id, [])

        tuned = tune.now(one)
        assert tuned.status == "pending"
        assert stepped.lanes.get(SHOP) == Lane(SHOP, painted.id, [tuned.id])
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)

    assert [status(stepped, a.id) for a in (recycled, painted, tuned)] == ["succeeded"] * 3
    assert load_car(stepped, one.id).log == "recycle;tune;"
    assert load_car(stepped, two.id).log == "paint;"
    assert redis_keys(stepped) == []
    assert stepped.lanes.count() == 0


def test_empty_concurrency_key_falls_back_to_the_tenancy_key(stepped: Stepped, car: Car) -> None:
    @stepped.app.stepped_action(outbound=True, concurrency_key=lambda car: [])
    def wax(car: Car) -> None:
        pass

    action = wax.now(car)
    assert action.concurrency_key == f"Car/{car.id}/wax"
    assert stepped.lanes.keys() == [f"Car/{car.id}/wax"]


# -- one performing action per lane ------------------------------------------------------------


@pytest.mark.parametrize("final", ["succeeded", "failed", "cancelled", "timed_out"])
def test_the_lane_starts_the_next_action_whatever_the_current_one_ends_with(
    stepped: Stepped, car: Car, final: str
) -> None:
    shop = define_shop(stepped)
    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        waiting = shop.paint.now(car)
        assert (held.status, waiting.status) == ("performing", "pending")
        assert waiting.started_at is None
        assert jobs.enqueued == []

        stepped.complete(held.id, final)
        assert status(stepped, held.id) == final
        assert stepped.lanes.get(SHOP) == Lane(SHOP, waiting.id, [])
        assert [(j.kind, j.name) for j in jobs.enqueued] == [("action", "paint")]
        jobs.perform_all()

    assert status(stepped, waiting.id) == "succeeded"
    assert load_car(stepped, car.id).honks == 1
    assert redis_keys(stepped) == []


def test_a_failing_step_releases_the_lane(stepped: Stepped, car: Car) -> None:
    app = stepped.app

    @app.stepped_action(concurrency_key=SHOP)
    def crash(step: Any, car: Car) -> None:
        step.do(stall)

    @app.stepped_action(outbound=True)
    def stall(car: Car) -> None:
        pass

    @app.stepped_action(concurrency_key=SHOP)
    def follow(car: Car) -> None:
        car.note("follow")

    with stepped.capture():
        crashing = crash.now(car)
        following = follow.now(car)
        assert stepped.lanes.get(SHOP) == Lane(SHOP, crashing.id, [following.id])
        perform_stepped_actions(stepped, complete_outbound=lambda a: "failed")

    assert status(stepped, crashing.id) == "failed"
    assert status(stepped, following.id) == "succeeded"
    assert load_car(stepped, car.id).log == "follow;"
    assert redis_keys(stepped) == []


def test_one_performing_action_per_lane_in_fifo_order(stepped: Stepped, car: Car) -> None:
    shop = define_shop(stepped)
    started: list[int] = []

    def on_start(sender: Any, action_id: int, name: str, **_: Any) -> None:
        started.append(action_id)

    signals.action_started.connect(on_start, weak=False)
    try:
        with stepped.capture() as jobs:
            a = shop.hold.now(car)
            b = shop.hold.now(car)
            assert stepped.lanes.get(SHOP) == Lane(SHOP, a.id, [b.id])
            stepped.complete(a.id)
            jobs.perform_all()
            assert stepped.lanes.get(SHOP) == Lane(SHOP, b.id, [])
            c = shop.hold.now(car)
            assert stepped.lanes.get(SHOP) == Lane(SHOP, b.id, [c.id])
            # the lane's sequence grows with every queued action (scores are FIFO)
            pending = lane_key(stepped, SHOP, "pending")
            scores = stepped.redis.zrange(pending, 0, -1, withscores=True)
            assert scores == [(str(c.id).encode(), 2.0)]
            with stepped.session() as s:
                performing = s.scalar(
                    select(func.count())
                    .select_from(Action)
                    .where(Action.concurrency_key == SHOP, Action.status == "performing")
                )
            assert performing == 1
            stepped.complete(b.id)
            jobs.perform_all()
            stepped.complete(c.id)
            jobs.perform_all()
    finally:
        signals.action_started.disconnect(on_start)

    assert started == [a.id, b.id, c.id]
    assert [status(stepped, x.id) for x in (a, b, c)] == ["succeeded"] * 3
    assert redis_keys(stepped) == []


def test_an_action_alone_in_its_lane_leaves_no_key_behind(stepped: Stepped, car: Car) -> None:
    @stepped.app.stepped_action
    def drive(car: Car, miles: int) -> None:
        car.mileage += miles

    action = drive.now(car, 3)
    assert action.status == "succeeded"
    assert redis_keys(stepped) == []
    assert stepped.lanes.get(f"Car/{car.id}/drive") is None
    assert (stepped.lanes.keys(), stepped.lanes.count()) == ([], 0)


def test_lanes_get_keys_count(stepped: Stepped, car: Car) -> None:
    shop = define_shop(stepped)
    assert stepped.lanes.get(SHOP) is None
    assert (stepped.lanes.keys(), stepped.lanes.count(), stepped.lanes.all()) == ([], 0, [])
    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        parent = shop.service.now(car, 7)
        jobs.perform_all()
        lane = stepped.lanes.get(SHOP)
        assert lane is not None
        assert lane.key == SHOP
        assert isinstance(lane.current_id, int) and lane.current_id == held.id
        (pending,) = lane.pending_ids
        assert isinstance(pending, int)
        assert stepped.get_action(pending).name == "paint"
        # the parent holds its own lane while it waits for its child
        assert stepped.lanes.keys() == sorted([SHOP, "svc/7"])
        assert stepped.lanes.count() == 2
        assert stepped.lanes.get("svc/7") == Lane("svc/7", parent.id, [])
        assert sorted(lane.key for lane in stepped.lanes.all()) == sorted([SHOP, "svc/7"])
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)
    assert stepped.lanes.count() == 0
    assert redis_keys(stepped) == []


# -- superseding -------------------------------------------------------------------------------


def test_a_newcomer_supersedes_older_pending_actions_and_takes_over_their_parents(
    stepped: Stepped, car: Car
) -> None:
    shop = define_shop(stepped)
    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        first_parent = shop.service.now(car, 1)
        jobs.perform_all()
        (first,) = [a for a in stored_actions(stepped, "paint")]
        assert first.status == "pending"

        second_parent = shop.service.now(car, 2)
        jobs.perform_all()
        first_now, second = stored_actions(stepped, "paint")
        assert first_now.status == "superseded"
        assert first_now.completed_at is not None
        assert second.status == "pending"
        assert stepped.lanes.get(SHOP) == Lane(SHOP, held.id, [second.id])

        # a root newcomer supersedes too, and takes over both parents
        third = shop.paint.now(car, 3)
        assert third.status == "pending"
        assert status(stepped, second.id) == "superseded"
        assert stepped.lanes.get(SHOP) == Lane(SHOP, held.id, [third.id])
        # each parent's link was copied onto the action that superseded its child; the
        # links stay there and count when the last superseder (third) completes
        assert stepped.get_action(second.id).superseded_by_id == third.id
        for parent, carrier in ((first_parent, second), (second_parent, third)):
            step = stepped.get_action(parent.id).steps[0]
            waiting = [link for link in links_of_step(stepped, step.id) if link.state == "waiting"]
            assert [link.action_id for link in waiting] == [carrier.id]
            assert step.pending_actions_count == 1
        # superseding copies the link of the step that started the superseded action:
        # that step keeps the child it started and gains its superseder
        assert [a.id for a in stepped.get_action(first_parent.id).steps[0].actions] == [
            first.id,
            second.id,
        ]
        step = stepped.get_action(first_parent.id).steps[0]
        assert [(link.action_id, link.state) for link in links_of_step(stepped, step.id)] == [
            (first.id, "transferred"),
            (second.id, "waiting"),
        ]
        assert [a.id for a in stepped.get_action(second_parent.id).steps[0].actions] == [
            second.id,
            third.id,
        ]
        assert status(stepped, first_parent.id) == "performing"

        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)

    assert status(stepped, third.id) == "succeeded"
    assert status(stepped, first_parent.id) == "succeeded"
    assert status(stepped, second_parent.id) == "succeeded"
    assert [a.status for a in stored_actions(stepped, "paint")] == [
        "superseded",
        "superseded",
        "succeeded",
    ]
    for parent in (first_parent, second_parent):
        step = stepped.get_action(parent.id).steps[0]
        assert [(link.state, link.outcome) for link in links_of_step(stepped, step.id)] == [
            ("transferred", "superseded"),
            ("done", "succeeded"),
        ]
    assert load_car(stepped, car.id).honks == 1
    assert redis_keys(stepped) == []


def test_superseding_a_child_nested_several_levels_deep(stepped: Stepped, car: Car) -> None:
    shop = define_shop(stepped)
    app = stepped.app
    nest = app.stepped_action("nest", actor=Car, concurrency_key=lambda car, depth: f"nest/{depth}")

    @nest.step
    def descend(step: Any, car: Car, depth: int) -> None:
        if depth:
            step.do(nest, depth - 1)
        else:
            step.do(shop.paint, "deep")

    @nest.succeeded
    def stamp(action: Any, car: Car, depth: int) -> None:
        car.note(f"nest{depth}")

    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        root = nest.now(car, 4)
        jobs.perform_all()
        (deep_paint,) = stored_actions(stepped, "paint")
        assert deep_paint.status == "pending"
        assert deep_paint.ancestry.count(",") == 6  # five ancestors
        newcomer = shop.paint.now(car, "top")
        superseded = stepped.get_action(deep_paint.id)
        assert superseded.status == "superseded" and superseded.completed_at is not None
        deepest_parent = superseded.parent_steps[0]
        waiting = [
            link for link in links_of_step(stepped, deepest_parent.id) if link.state == "waiting"
        ]
        assert [link.action_id for link in waiting] == [newcomer.id]

        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)

    assert status(stepped, held.id) == "succeeded"
    assert status(stepped, newcomer.id) == "succeeded"
    assert status(stepped, root.id) == "succeeded"
    assert [a.status for a in stored_actions(stepped, "nest")] == ["succeeded"] * 5
    assert load_car(stepped, car.id).log == "hold;nest0;nest1;nest2;nest3;nest4;"
    assert load_car(stepped, car.id).honks == 1
    assert redis_keys(stepped) == []


def test_superseding_a_sibling_releases_its_slot(stepped: Stepped, car: Car) -> None:
    shop = define_shop(stepped)
    app = stepped.app

    @app.stepped_action
    def twice(step: Any, car: Car) -> None:
        step.do(shop.paint, 1)
        step.do(shop.paint, 2)

    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        parent = twice.now(car)
        jobs.perform_all()
        first, second = stored_actions(stepped, "paint")
        assert (first.status, second.status) == ("superseded", "pending")
        step = stepped.get_action(parent.id).steps[0]
        # the step already waits on the superseder: the sibling's slot is released
        assert step.pending_actions_count == 1
        assert [link.state for link in links_of_step(stepped, step.id)] == ["released", "waiting"]
        assert stepped.lanes.get(SHOP) == Lane(SHOP, held.id, [second.id])
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)

    assert status(stepped, parent.id) == "succeeded"
    step = stepped.get_action(parent.id).steps[0]
    assert (step.pending_actions_count, step.unsuccessful_actions_count) == (0, 0)
    assert [(link.state, link.outcome) for link in links_of_step(stepped, step.id)] == [
        ("released", "superseded"),
        ("done", "succeeded"),
    ]
    assert load_car(stepped, car.id).honks == 1
    assert redis_keys(stepped) == []


def test_a_failing_superseder_fails_the_parents_it_took_over(stepped: Stepped, car: Car) -> None:
    shop = define_shop(stepped)
    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        parent = shop.service.now(car, 1)
        jobs.perform_all()
        newcomer = shop.hold.now(car)  # outbound: we fail it from outside
        assert [a.status for a in stored_actions(stepped, "paint")] == ["superseded"]
        stepped.complete(held.id)
        jobs.perform_all()
        assert status(stepped, newcomer.id) == "performing"
        stepped.complete(newcomer.id, "failed")
        jobs.perform_all()

    assert status(stepped, parent.id) == "failed"
    assert redis_keys(stepped) == []


# -- checksums ---------------------------------------------------------------------------------


def define_visit(stepped: Stepped, **options: Any) -> Any:
    app = stepped.app
    visit = app.stepped_action("visit", actor=Car, checksum=lambda car, place: place, **options)

    @visit.step
    def go(step: Any, car: Car, place: str) -> None:
        car.location = place
        car.note(place)

    return visit


def achievement(stepped: Stepped, checksum_key: str) -> str | None:
    with stepped.session() as s:
        return s.scalar(
            select(Achievement.checksum).where(Achievement.checksum_key == checksum_key)
        )


def test_identical_checksum_performing_in_the_lane_shares_the_action(
    stepped: Stepped, car: Car
) -> None:
    visit = define_visit(stepped, outbound=True)
    app = stepped.app

    @app.stepped_action(concurrency_key=lambda car, n: f"trip/{n}")
    def trip(step: Any, car: Car, n: int) -> None:
        step.do(visit, "paris")

    with stepped.capture() as jobs:
        performing = visit.now(car, "paris")
        again = visit.now(car, "paris")  # a root caller gets the performing action back
        assert again.id == performing.id and again.status == "performing"
        first, second = trip.now(car, 1), trip.now(car, 2)
        jobs.perform_all()
        assert [a.id for a in stored_actions(stepped, "visit")] == [performing.id]
        for parent in (first, second):
            step = stepped.get_action(parent.id).steps[0]
            assert [a.id for a in step.actions] == [performing.id]
            assert [(link.action_id, link.state) for link in links_of_step(stepped, step.id)] == [
                (performing.id, "waiting")
            ]
        assert stepped.lanes.get(f"Car/{car.id}/visit") == Lane(
            f"Car/{car.id}/visit", performing.id, []
        )
        stepped.complete(performing.id)
        jobs.perform_all()

    assert status(stepped, first.id) == status(stepped, second.id) == "succeeded"
    assert load_car(stepped, car.id).log == "paris;"
    assert redis_keys(stepped) == []


def test_a_different_checksum_waits_in_the_lane(stepped: Stepped, car: Car) -> None:
    visit = define_visit(stepped, outbound=True)
    with stepped.capture():
        paris = visit.now(car, "paris")
        rome = visit.now(car, "rome")
        assert rome.id != paris.id and rome.status == "pending"
        key = f"Car/{car.id}/visit"
        assert stepped.lanes.get(key) == Lane(key, paris.id, [rome.id])
        # the lane remembers the pending checksum and hands it over on promotion
        assert stepped.lanes.current_checksum(key) == (paris.id, checksum_digest("paris"))
        stepped.complete(paris.id)
        assert stepped.lanes.current_checksum(key) == (rome.id, checksum_digest("rome"))
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)
    assert achievement(stepped, f"Car/{car.id}/visit") == checksum_digest("rome")
    assert redis_keys(stepped) == []


def test_an_achieved_checksum_succeeds_without_rows_and_a_new_one_replaces_it(
    stepped: Stepped, car: Car
) -> None:
    visit = define_visit(stepped)
    key = f"Car/{car.id}/visit"
    first = visit.now(car, "paris")
    assert first.status == "succeeded"
    assert first.checksum == checksum_digest("paris")
    assert achievement(stepped, key) == checksum_digest("paris")
    counts = (count(stepped, Action), count(stepped, Step), count(stepped, ParentLink))

    with stepped.capture() as jobs:
        skipped = visit.now(car, "paris")
        assert jobs.enqueued == []
    assert skipped.status == "succeeded" and skipped.id is None
    assert skipped.completed
    assert (count(stepped, Action), count(stepped, Step), count(stepped, ParentLink)) == counts
    assert load_car(stepped, car.id).log == "paris;"
    assert redis_keys(stepped) == []

    changed = visit.now(car, "rome")
    assert changed.status == "succeeded" and changed.id is not None
    assert load_car(stepped, car.id).log == "paris;rome;"
    assert achievement(stepped, key) == checksum_digest("rome")
    assert count(stepped, Achievement) == 1
    # the old checksum is no longer the achievement: it performs again
    assert visit.now(car, "paris").id is not None
    assert achievement(stepped, key) == checksum_digest("paris")


def test_an_achieved_child_is_skipped_and_counts_as_success(stepped: Stepped, car: Car) -> None:
    visit = define_visit(stepped)

    @stepped.app.stepped_action
    def trip(step: Any, car: Car) -> None:
        step.do(visit, "paris")

    visit.now(car, "paris")
    with stepped.capture():
        parent = trip.now(car)
        perform_stepped_actions(stepped)
    assert status(stepped, parent.id) == "succeeded"
    assert len(stored_actions(stepped, "visit")) == 1
    assert load_car(stepped, car.id).log == "paris;"


def test_starting_erases_the_achievement_and_only_success_writes_it(
    stepped: Stepped, car: Car
) -> None:
    visit = define_visit(stepped, outbound=True)
    key = f"Car/{car.id}/visit"
    with stepped.capture() as jobs:
        paris = visit.now(car, "paris")
        assert achievement(stepped, key) is None
        stepped.complete(paris.id)
        assert achievement(stepped, key) == checksum_digest("paris")

        rome = visit.now(car, "rome")
        assert rome.status == "performing"
        assert achievement(stepped, key) is None  # erased when rome started
        stepped.complete(rome.id, "failed")
        assert achievement(stepped, key) is None

        again = visit.now(car, "paris")  # nothing achieved any more: it performs
        assert again.id is not None and again.status == "performing"
        stepped.complete(again.id, "cancelled")
        assert achievement(stepped, key) is None
        assert jobs.enqueued == []
    assert redis_keys(stepped) == []


def test_a_failed_after_callback_grants_no_achievement(stepped: Stepped, car: Car) -> None:
    visit = define_visit(stepped)
    calls: list[str] = []

    @visit.succeeded
    def explode(action: Any, car: Car, place: str) -> None:
        calls.append(place)
        raise RuntimeError("callback failed")

    first = visit.now(car, "paris")
    assert first.status == "succeeded"
    assert first.after_callbacks_failed_count == 1
    assert achievement(stepped, f"Car/{car.id}/visit") is None
    second = visit.now(car, "paris")
    assert second.id is not None and second.id != first.id
    assert calls == ["paris", "paris"]
    assert redis_keys(stepped) == []


@pytest.mark.parametrize("form", ["option", "decorator"])
def test_checksum_key_scopes_reuse_across_actors(stepped: Stepped, form: str) -> None:
    if form == "option":
        visit = define_visit(stepped, checksum_key=["Car", "visit"])
    else:
        visit = define_visit(stepped)

        @visit.checksum_key
        def everywhere(car: Car, place: str) -> tuple[str, str]:
            return ("Car", "visit")

    one, two = make_car(stepped), make_car(stepped)
    done = visit.now(one, "paris")
    assert done.checksum_key == "Car/visit"
    assert achievement(stepped, "Car/visit") == checksum_digest("paris")
    skipped = visit.now(two, "paris")
    assert skipped.status == "succeeded" and skipped.id is None
    assert load_car(stepped, two.id).log == ""
    assert visit.now(two, "rome").id is not None
    assert achievement(stepped, "Car/visit") == checksum_digest("rome")


def test_without_checksum_key_reuse_stays_per_actor(stepped: Stepped) -> None:
    visit = define_visit(stepped)
    one, two = make_car(stepped), make_car(stepped)
    visit.now(one, "paris")
    assert visit.now(two, "paris").id is not None
    assert load_car(stepped, two.id).log == "paris;"


def test_sharing_never_attaches_to_an_action_that_already_completed(
    stepped: Stepped, car: Car
) -> None:
    """The lane still names the action as current with that checksum, SQL says it is done.

    This is the window between a completion's guarded status update and its lane
    release; the share check must not attach a parent step to it.
    """
    visit = define_visit(stepped, outbound=True)

    @stepped.app.stepped_action
    def trip(step: Any, car: Car) -> None:
        step.do(visit, "paris")

    key = f"Car/{car.id}/visit"
    with stepped.capture() as jobs:
        performing = visit.now(car, "paris")
        with stepped.session() as s:  # the first half of complete(): status only
            s.execute(update(Action).where(Action.id == performing.id).values(status="succeeded"))
        assert stepped.lanes.current_checksum(key) == (performing.id, checksum_digest("paris"))
        parent = trip.now(car)
        jobs.perform_all()
        visits = stored_actions(stepped, "visit")
        assert [v.status for v in visits] == ["succeeded", "pending"]
        assert stepped.lanes.get(key) == Lane(key, performing.id, [visits[1].id])
        # the second half: the lane moves on, the newcomer performs
        stepped.core.drive(stepped.core.completer.finish(performing.id, Delivery()))
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)

    assert status(stepped, visits[1].id) == "succeeded"
    assert status(stepped, parent.id) == "succeeded"
    assert redis_keys(stepped) == []


# -- deadlocks ---------------------------------------------------------------------------------


def define_garage(stepped: Stepped) -> tuple[Any, Any]:
    """``tidy`` (lane ``Car/shop``) runs ``nest`` levels that end in ``polish`` (same lane)."""
    app = stepped.app

    @app.stepped_action(concurrency_key="Car/shop")
    def tidy(step: Any, car: Car, depth: int) -> None:
        step.do(nest, depth)

    nest = app.stepped_action("nest", actor=Car, concurrency_key=lambda car, d: f"nest/{d}")

    @nest.step
    def descend(step: Any, car: Car, depth: int) -> None:
        if depth:
            step.do(nest, depth - 1)
        else:
            step.do(polish)

    @app.stepped_action(concurrency_key=["Car", "shop"])
    def polish(car: Car) -> None:
        car.note("polish")

    return tidy, polish


def test_a_descendant_joining_its_ancestors_lane_is_deadlocked(stepped: Stepped, car: Car) -> None:
    tidy, _ = define_garage(stepped)
    handled: list[BaseException] = []

    def on_handled(sender: Any, exception: BaseException, **_: Any) -> None:
        handled.append(exception)

    signals.exception_handled.connect(on_handled, weak=False)
    try:
        with stepped.capture():
            root = tidy.now(car, 0)
            perform_stepped_actions(stepped)
    finally:
        signals.exception_handled.disconnect(on_handled)

    (polished,) = stored_actions(stepped, "polish")
    assert polished.status == "deadlocked"
    assert polished.completed_at is not None and polished.started_at is None
    assert [type(e) for e in handled] == [Deadlock]
    done = stepped.get_action(root.id)
    assert done.status == "failed"
    assert [s.status for s in done.steps] == ["failed"]
    assert [a.status for a in stored_actions(stepped, "nest")] == ["failed"]
    assert load_car(stepped, car.id).log == ""
    assert redis_keys(stepped) == []


def test_a_deadlock_raises_unless_handled(stepped: Stepped, car: Car) -> None:
    tidy, _ = define_garage(stepped)
    with stepped.capture():
        root = tidy.now(car, 2)
        with (
            handle_stepped_action_exceptions(stepped, only=(ValueError,)),
            pytest.raises(Deadlock, match="ancestor"),
        ):
            perform_stepped_actions(stepped)
    (polished,) = stored_actions(stepped, "polish")
    assert polished.status == "deadlocked"
    # the parent step failed before the exception propagated
    assert status(stepped, root.id) == "failed"
    assert [a.status for a in stored_actions(stepped, "nest")] == ["failed"] * 3
    assert redis_keys(stepped) == []


def test_an_identical_checksum_on_an_ancestor_is_a_deadlock_not_a_share(
    stepped: Stepped, car: Car
) -> None:
    app = stepped.app
    sync = app.stepped_action("sync", actor=Car, checksum=lambda car, depth: "same")

    @sync.step
    def recurse(step: Any, car: Car, depth: int) -> None:
        if depth:
            step.do(sync, depth - 1)

    with stepped.capture():
        root = sync.now(car, 1)
        perform_stepped_actions(stepped)

    first, child = stored_actions(stepped, "sync")
    assert first.id == root.id and first.status == "failed"
    assert child.status == "deadlocked"
    assert redis_keys(stepped) == []


@contextmanager
def round_trips(stepped: Stepped) -> Iterator[dict[str, int]]:
    """Count SQL statements and Redis commands issued inside the block."""
    counts = {"sql": 0, "redis": 0}

    def on_sql(*_: Any) -> None:
        counts["sql"] += 1

    client = stepped.redis
    original = client.execute_command

    def counted(*args: Any, **options: Any) -> Any:
        counts["redis"] += 1
        return original(*args, **options)

    event.listen(stepped.engine, "before_cursor_execute", on_sql)
    client.execute_command = counted  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        event.remove(stepped.engine, "before_cursor_execute", on_sql)
        del client.execute_command


def decision_cost(stepped: Stepped, depth: int) -> dict[str, int]:
    """Round trips of starting the deadlocked ``polish`` up to its lane decision."""
    car = make_car(stepped)
    tidy = stepped.registry.find(Car, "tidy")
    runtime = stepped.core.entry
    original = runtime._deadlock
    decided: dict[str, int] = {}
    with stepped.capture() as jobs:
        tidy.now(car, depth)
        while not any(j.name == "polish" for j in jobs.enqueued):
            jobs.perform()
        with round_trips(stepped) as cost:

            def decide(action: Action, current_id: int | None) -> Deadlock:
                decided.update(cost)
                return original(action, current_id)

            runtime._deadlock = decide  # type: ignore[method-assign]
            try:
                jobs.perform()
            finally:
                del runtime._deadlock
    polished = stored_actions(stepped, "polish")[-1]
    assert polished.status == "deadlocked"
    assert polished.ancestry.count(",") == depth + 3  # tidy and depth + 1 nest levels
    return decided


def test_deciding_a_deadlock_costs_the_same_at_any_depth(stepped: Stepped) -> None:
    """The ancestor check reads the stored ancestry: O(1) round trips at any depth."""
    define_garage(stepped)
    shallow, deep = decision_cost(stepped, 1), decision_cost(stepped, 12)
    assert shallow == deep
    assert 0 < shallow["redis"] <= 2


# -- lane internals: compare-and-set join, lock, crash between SQL and Redis --------------------


def test_join_never_drops_a_pending_action_the_caller_did_not_supersede(stepped: Stepped) -> None:
    lanes = stepped.lanes
    assert lanes.join("K", 1, None, ",").outcome == "perform"
    assert lanes.join("K", 2, None, ",").outcome == "queued"
    # two newcomers race: both see 2 pending
    assert lanes.join("K", 3, None, ",").superseded == [2]
    assert lanes.join("K", 3, None, ",").outcome == "retry"
    assert lanes.join("K", 4, None, ",").superseded == [2]
    # 3 superseded 2 in SQL and joins; 4 superseded 2 too but must not drop 3
    third = lanes.join("K", 3, None, ",", [2])
    assert (third.outcome, third.superseded) == ("queued", [2])
    fourth = lanes.join("K", 4, None, ",", [2])
    assert (fourth.outcome, fourth.superseded) == ("retry", [3])
    fourth = lanes.join("K", 4, None, ",", [2, 3])
    assert (fourth.outcome, fourth.superseded) == ("queued", [3])
    assert lanes.get("K") == Lane("K", 1, [4])
    # joining again is idempotent; a descendant of the current action deadlocks
    assert lanes.join("K", 4, None, ",").outcome == "queued"
    assert lanes.join("K", 1, None, ",").outcome == "perform"
    assert lanes.join("K", 9, None, ",5,1,") == lanes.join("K", 9, None, ",1,")
    assert lanes.join("K", 9, None, ",1,").current_id == 1
    assert lanes.release("K", 1) == ("next", 4)
    assert lanes.release("K", 4) == ("empty", None)
    assert redis_keys(stepped) == []


def test_enter_supersedes_in_sql_before_redis_under_the_lane_lock(stepped: Stepped) -> None:
    lanes = stepped.lanes
    lanes.join("K", 1, None, ",")
    lanes.join("K", 2, None, ",")
    seen: list[tuple[list[int], bool, list[int]]] = []

    def supersede(ids: list[int]) -> None:
        lock_held = stepped.redis.exists(lane_key(stepped, "K", "lock")) == 1
        lane = lanes.get("K")
        assert lane is not None
        seen.append((ids, lock_held, lane.pending_ids))
        if ids == [2]:  # a concurrent join (that superseded 2 as well) slips in
            lanes.join("K", 3, None, ",", [2])

    result = lanes.enter("K", 4, "cs", ",", supersede)
    assert (result.outcome, result.superseded) == ("queued", [2, 3])
    assert seen == [([2], True, [2]), ([3], True, [3])]
    assert lanes.get("K") == Lane("K", 1, [4])
    assert stepped.redis.exists(lane_key(stepped, "K", "lock")) == 0
    # a lane without pending actions needs no lock and no SQL
    assert lanes.enter("L", 5, None, ",", lambda ids: pytest.fail("no supersede")).outcome == (
        "perform"
    )


def test_the_join_script_takes_the_lane_lock_with_an_expiry_and_lets_it_go_on_error(
    stepped: Stepped,
) -> None:
    store = stepped.lanes
    store.join("K", 1, None, ",")
    store.join("K", 2, None, ",")
    key = lane_key(stepped, "K", "lock")
    expiry: list[int] = []

    def supersede(ids: list[int]) -> None:
        expiry.append(stepped.redis.pttl(key))
        raise Crash("the SQL transaction failed")

    with pytest.raises(Crash):
        store.enter("K", 3, None, ",", supersede)
    assert 0 < expiry[0] <= lanes.LOCK_TIMEOUT * 1000
    assert stepped.redis.exists(key) == 0  # released: the next join need not wait
    assert store.get("K") == Lane("K", 1, [2])  # nothing left the lane
    # a lock someone else holds is neither taken nor dropped by the script
    other = store.lock("K")
    assert other.acquire(blocking=False)
    assert store.join("K", 3, None, ",", lock=("mine", "take")).locked is False
    assert store.join("K", 3, None, ",", [2], lock=("mine", "drop")).outcome == "queued"
    assert stepped.redis.get(key) == other.local.token
    other.release()


def test_an_error_while_superseding_is_the_one_raised_when_redis_cannot_unlock(
    stepped: Stepped, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = stepped.lanes
    store.join("K", 1, None, ",")
    store.join("K", 2, None, ",")

    def supersede(ids: list[int]) -> None:
        def gone(*_: Any) -> None:
            raise redis.exceptions.ConnectionError("Redis went away")

        monkeypatch.setattr(redis.lock.Lock, "do_release", gone)
        raise Crash("the SQL transaction failed")

    with pytest.raises(Crash):
        store.enter("K", 3, None, ",", supersede)
    monkeypatch.undo()
    assert stepped.redis.pttl(lane_key(stepped, "K", "lock")) > 0  # left to expire
    stepped.redis.delete(lane_key(stepped, "K", "lock"))
    assert store.get("K") == Lane("K", 1, [2])


def test_the_lane_lock_has_a_token_and_an_expiry(stepped: Stepped) -> None:
    lock = stepped.lanes.lock(SHOP)
    assert lock.acquire(blocking=False)
    key = lane_key(stepped, SHOP, "lock")
    token = stepped.redis.get(key)
    assert token is not None and len(token) >= 32
    assert 0 < stepped.redis.pttl(key) <= lanes.LOCK_TIMEOUT * 1000
    other = stepped.lanes.lock(SHOP)
    assert not other.acquire(blocking=False)
    # an expired lock belongs to nobody: releasing it must not delete a new holder's
    stepped.redis.delete(key)
    assert other.acquire(blocking=False)
    with pytest.raises(redis.exceptions.LockError):
        lock.release()
    assert stepped.redis.get(key) != token
    other.release()
    assert redis_keys(stepped) == []


class Crash(Exception):
    """The worker died between two writes."""


def crash_after_sql_supersede(
    stepped: Stepped, monkeypatch: pytest.MonkeyPatch, reached_redis: bool = False
) -> None:
    """Kill the next join that removes superseded actions: after its SQL transaction
    committed, and before (or, with ``reached_redis``, after) its Redis script ran."""
    lanes = stepped.lanes
    original = lanes.join

    def join(key: str, action_id: int, *args: Any, **options: Any) -> Any:
        if len(args) > 2 and list(args[2]):
            monkeypatch.setattr(lanes, "join", original)
            if reached_redis:
                original(key, action_id, *args, **options)
            raise Crash("killed after the SQL supersede")
        return original(key, action_id, *args, **options)

    monkeypatch.setattr(lanes, "join", join)


@pytest.mark.parametrize("reached_redis", [False, True], ids=["before-redis", "after-redis"])
def test_a_redelivered_start_recovers_from_a_crash_while_superseding(
    stepped: Stepped, car: Car, monkeypatch: pytest.MonkeyPatch, reached_redis: bool
) -> None:
    shop = define_shop(stepped)
    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        first_parent = shop.service.now(car, 1)
        jobs.perform_all()
        (first,) = stored_actions(stepped, "paint")
        second_parent = shop.service.now(car, 2)
        (start,) = jobs.take("action")
        crash_after_sql_supersede(stepped, monkeypatch, reached_redis)
        with pytest.raises(Crash):
            stepped.core.run_message(start)

        # SQL: the old one is superseded and its parent waits on the newcomer; Redis:
        # the old one still holds its place (or the newcomer took it already).
        first, second = stored_actions(stepped, "paint")
        assert (first.status, second.status) == ("superseded", "pending")
        step = stepped.get_action(first_parent.id).steps[0]
        waiting = [
            link.action_id for link in links_of_step(stepped, step.id) if link.state == "waiting"
        ]
        assert waiting == [second.id]
        in_lane = second.id if reached_redis else first.id
        assert stepped.lanes.get(SHOP) == Lane(SHOP, held.id, [in_lane])
        assert not stepped.redis.exists(lane_key(stepped, SHOP, "lock"))  # released on the way out

        stepped.core.run_message(start)  # the broker delivers the message again
        assert stepped.lanes.get(SHOP) == Lane(SHOP, held.id, [second.id])
        assert len(stored_actions(stepped, "paint")) == 2
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)

    assert [a.status for a in stored_actions(stepped, "paint")] == ["superseded", "succeeded"]
    assert status(stepped, first_parent.id) == "succeeded"
    assert status(stepped, second_parent.id) == "succeeded"
    assert load_car(stepped, car.id).honks == 1
    assert redis_keys(stepped) == []


def test_a_superseded_action_reaching_the_lane_front_before_the_redelivery_moves_on(
    stepped: Stepped, car: Car, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = define_shop(stepped)
    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        first_parent = shop.service.now(car, 1)
        jobs.perform_all()
        second_parent = shop.service.now(car, 2)
        (start,) = jobs.take("action")
        crash_after_sql_supersede(stepped, monkeypatch)
        with pytest.raises(Crash):
            stepped.core.run_message(start)
        first, second = stored_actions(stepped, "paint")

        # the lane moves on before the message comes back: the superseded action
        # reaches the front and is released at once, nothing runs
        stepped.complete(held.id)
        assert stepped.lanes.get(SHOP) is None
        assert jobs.enqueued == []
        assert status(stepped, first.id) == "superseded"
        assert stepped.get_action(first.id).started_at is None

        stepped.core.run_message(start)  # redelivered: the newcomer performs now
        perform_stepped_actions(stepped)

    assert status(stepped, second.id) == "succeeded"
    assert status(stepped, first_parent.id) == "succeeded"
    assert status(stepped, second_parent.id) == "succeeded"
    assert load_car(stepped, car.id).honks == 1
    assert redis_keys(stepped) == []


def test_an_action_superseded_while_promoted_releases_the_lane(stepped: Stepped, car: Car) -> None:
    """Superseding (SQL) races the lane promoting the same action (Redis)."""
    shop = define_shop(stepped)
    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        parent = shop.service.now(car, 1)
        jobs.perform_all()
        (old,) = stored_actions(stepped, "paint")
        stepped.complete(held.id)  # promotes old; its resume message is in flight
        assert stepped.lanes.get(SHOP) == Lane(SHOP, old.id, [])
        newcomer = shop.hold.now(car)  # queued behind old, which is still pending in SQL
        assert stepped.lanes.get(SHOP) == Lane(SHOP, old.id, [newcomer.id])
        stepped.core.drive(stepped.core.entry.supersede([old.id], newcomer.id))  # racing join
        jobs.perform_all()  # old's resume: superseded, so it releases the lane
        assert status(stepped, old.id) == "superseded"
        assert status(stepped, newcomer.id) == "performing"
        assert stepped.lanes.get(SHOP) == Lane(SHOP, newcomer.id, [])
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)

    assert status(stepped, parent.id) == "succeeded"
    assert redis_keys(stepped) == []


# -- lane handoff (issue 11, item 2) ----------------------------------------------------------


def test_a_completing_task_hands_its_lane_to_the_next_action_inline(
    stepped: Stepped, car: Car
) -> None:
    """As Stepped's ``Performance#forward``: the task that completes the lane's current
    action performs the next pending one itself; no message is enqueued for it."""
    shop = define_shop(stepped)
    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        queued = shop.paint.now(car)  # pending behind the held action
        assert stepped.lanes.get(SHOP) == Lane(SHOP, held.id, [queued.id])
        shop.hold.complete_later(car)
        assert [j.kind for j in jobs.enqueued] == ["complete"]
        assert jobs.perform() == 1  # the completion message: it also performs ``paint``
        assert jobs.enqueued == []
        assert status(stepped, queued.id) == "succeeded"
    assert load_car(stepped, car.id).honks == 1
    assert redis_keys(stepped) == []


def test_a_caller_outside_a_task_hands_the_lane_on_with_a_message(
    stepped: Stepped, car: Car
) -> None:
    """``stepped.complete()`` from a web request does not run the next action's steps in
    that request: it sends ``stepped.resume`` (the kind shown is ``action``)."""
    shop = define_shop(stepped)
    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        queued = shop.paint.now(car)
        stepped.complete(held.id)
        assert [(j.kind, j.name) for j in jobs.enqueued] == [("action", "paint")]
        assert status(stepped, queued.id) == "pending"
        jobs.perform_all()
        assert status(stepped, queued.id) == "succeeded"
    assert redis_keys(stepped) == []


def test_a_join_with_flags_answers_busy_or_lost_and_changes_nothing(stepped: Stepped) -> None:
    """``b``: another current action is reported, not queued behind; ``e``: a lane with no
    current action, though SQL has one performing, is reported lost, not taken."""
    lanes = stepped.lanes
    assert lanes.join("K", 1, None, ",").outcome == LaneOutcome.PERFORM
    busy = lanes.join("K", 2, None, ",", flags="b")
    assert (busy.outcome, busy.current_id) == (LaneOutcome.BUSY, 1)
    assert lanes.get("K") == Lane("K", 1, [])
    assert lanes.join("K", 1, None, ",", flags="be").outcome == LaneOutcome.PERFORM  # its own
    assert lanes.join("gone", 3, None, ",", flags="e").outcome == LaneOutcome.LOST
    assert lanes.get("gone") is None
    assert lanes.join("gone", 3, None, ",", flags="b").outcome == LaneOutcome.PERFORM
