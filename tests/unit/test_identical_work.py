"""Identical work and deadlocks across every parent, as in Stepped (issue 11, items 3-4)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_stepped import Stepped
from celery_stepped.testing import perform_stepped_actions
from tests.conftest import load_car, make_car, stored_actions
from tests.models import Car
from tests.unit.test_lanes import redis_keys, status, succeed_outbound


def test_a_deadlock_through_a_shared_action_fails_up_instead_of_hanging(
    stepped: Stepped,
) -> None:
    """R1 ``deploy`` runs migrate M1; R2 ``release`` on car 2 shares M1; M1's next step
    starts ``release`` on car 2, whose lane R2 holds. R2 waits on M1 through sharing, so
    the newcomer is deadlocked (as Stepped does) and the failure travels up both trees."""
    app = stepped.app
    keys = {"concurrency_key": "db/migrate", "checksum_key": "db/migrate"}
    migrate = app.stepped_action("migrate", actor=Car, checksum=lambda car: "v1", **keys)
    car1, car2 = make_car(stepped), make_car(stepped)

    @migrate.step
    def schema(step: Any, car: Car) -> None:
        step.wait(5)

    @migrate.step
    def announce(step: Any, car: Car) -> None:
        step.on(load_car(stepped, car2.id), "release")

    @app.stepped_action
    def deploy(step: Any, car: Car) -> None:
        step.do(migrate)

    @app.stepped_action
    def release(step: Any, car: Car) -> None:
        step.do(migrate)

    with stepped.capture() as jobs:
        r1 = deploy.now(car1)
        jobs.perform(only="action")  # M1 performs; its first step waits
        r2 = release.now(car2)
        jobs.perform(only="action")  # R2's migrate shares M1
        (m1,) = stored_actions(stepped, "migrate")
        perform_stepped_actions(stepped)
    releases = stored_actions(stepped, "release")
    assert releases[0].id == r2.id
    (newcomer,) = [a for a in releases if a.id != r2.id]
    assert newcomer.status == "deadlocked"
    assert [status(stepped, i) for i in (m1.id, r1.id, r2.id)] == ["failed"] * 3
    assert redis_keys(stepped) == []


def test_sharing_needs_the_same_checksum_key_too(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    visit = app.stepped_action(
        "visit",
        actor=Car,
        outbound=True,
        concurrency_key="road",
        checksum=lambda car, place, key: place,
        checksum_key=lambda car, place, key: key,
    )

    @visit.step
    def go(step: Any, car: Car, place: str, key: str) -> None:
        pass

    with stepped.capture():
        first = visit.now(car, "paris", "a")
        second = visit.now(car, "paris", "b")  # same checksum, other key: its own action
        third = visit.now(car, "paris", "b")  # same checksum and key as the pending one
        assert second.id != first.id
        assert third.id == second.id  # shares the pending action (Stepped does)
        assert status(stepped, second.id) == "pending"
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)
    assert [a.status for a in stored_actions(stepped, "visit")] == ["succeeded", "succeeded"]


def test_work_achieved_while_an_identical_action_waited_is_not_performed_twice(
    stepped: Stepped, car: Car, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of identical work arriving while the current one completes: its share
    check missed the performing twin, so it queued; the twin then succeeded. Entering
    performing, it finds the achievement and is skipped (succeeded, body not run)."""
    app = stepped.app
    paint = app.stepped_action("paint", actor=Car, checksum=lambda car, color: color)

    @paint.step
    def dry(step: Any, car: Car, color: str) -> None:
        step.wait(60)

    @paint.step
    def coat(step: Any, car: Car, color: str) -> None:
        car.honk()

    with stepped.capture() as jobs:
        first = paint.now(car, "red")  # performing: waits 60 s
        monkeypatch.setattr(stepped.core.starter, "share", lambda action, call: None)
        second = paint.now(car, "red")  # the race: queued behind its twin
        monkeypatch.undo()
        assert status(stepped, second.id) == "pending"
        jobs.perform_all()  # the wait elapses: first succeeds, achieves red, hands over
    assert status(stepped, first.id) == "succeeded"
    assert status(stepped, second.id) == "succeeded"
    assert stepped.get_action(second.id).steps == []  # never performed a step
    assert load_car(stepped, car.id).honks == 1
    assert redis_keys(stepped) == []
