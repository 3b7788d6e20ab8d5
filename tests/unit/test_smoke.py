"""A first tree in eager and capture modes."""

from __future__ import annotations

from celery_stepped import ActionStatus, Stepped
from celery_stepped.testing import perform_stepped_actions
from tests.conftest import load_car
from tests.models import Car


def test_function_form_runs_now(stepped: Stepped, car: Car) -> None:
    @stepped.app.stepped_action
    def drive(car: Car, miles: int) -> None:
        car.mileage += miles

    action = drive.now(car, 5)
    assert action.status == ActionStatus.SUCCEEDED
    assert [s.status for s in action.steps] == ["succeeded"]
    assert load_car(stepped, car.id).mileage == 5


def test_fan_out_in_capture(stepped: Stepped, car: Car) -> None:
    app = stepped.app

    @app.stepped_action
    def drive(car: Car, miles: int) -> None:
        car.mileage += miles

    app.stepped_action("honk", actor=Car)
    park = app.stepped_action("park", actor=Car)

    @park.step
    def first(step, car, miles):
        step.do("honk")
        step.on([car, None], drive, miles)

    with stepped.capture() as jobs:
        action = park.now(car, 3)
        assert action.status == ActionStatus.PERFORMING
        assert [(j.kind, j.name) for j in jobs.enqueued] == [
            ("action", "honk"),
            ("action", "drive"),
        ]
        perform_stepped_actions(stepped)
    done = stepped.get_action(action.id)
    assert done.status == ActionStatus.SUCCEEDED
    assert [a.name for a in done.steps[0].actions] == ["honk", "drive"]
    stored = load_car(stepped, car.id)
    assert (stored.mileage, stored.honks) == (3, 1)
