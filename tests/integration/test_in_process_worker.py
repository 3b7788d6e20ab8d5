"""Trees on the pytest plugin's ``stepped_worker``: a Celery worker in a thread of the test
process (``celery.contrib.testing.worker``) on the test's app, real Redis and real SQL.

Every message goes through the broker (the run's Redis, its keys prefixed with the run's,
see :mod:`tests.isolation`); nothing here kills a process, so an in-process worker serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Task

from celery_stepped import Step, Stepped
from celery_stepped.definition import SteppedAction
from celery_stepped.models import Action
from celery_stepped.pytest_plugin import worker_queues
from celery_stepped.statuses import FINAL_STATUSES
from tests.conftest import load_car, make_car, stored_actions
from tests.integration.conftest import WAIT
from tests.models import Car


def wait_for(what: str, predicate: Callable[[], Any]) -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + WAIT
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_status(stepped: Stepped, action_id: int, *statuses: str) -> Action:
    """The action once its status is one of ``statuses`` (any final one when none)."""
    wanted = set(statuses or FINAL_STATUSES)

    def reached() -> Action | None:
        action = stepped.get_action(action_id)
        return action if action.status in wanted else None

    return wait_for(f"action {action_id} to be {sorted(wanted)}", reached)


def root_id(stepped: Stepped, request_id: str) -> int:
    """The id of the root action the worker created for a ``later()`` call."""

    def found() -> int | None:
        rows = [a for a in stored_actions(stepped) if a.request_id == request_id]
        return rows[0].id if rows else None

    return int(wait_for(f"the root of request {request_id}", found))


@dataclass
class Garage:
    """The actions of this module, defined on the test's app before its worker starts."""

    trip: SteppedAction[Any]
    leg: SteppedAction[Any]
    service: SteppedAction[Any]
    tow: SteppedAction[Any]
    tow_task: Task


def define_trip(app: Any) -> tuple[SteppedAction[Any], SteppedAction[Any]]:
    """A root whose first step fans out ``legs`` children, each in a lane of its own, and
    whose second step notes the end; each leg waits ``pause`` seconds, then notes itself."""
    leg = app.stepped_action("leg", actor=Car, concurrency_key=lambda car, n, pause: ["leg", n])

    @leg.step
    def rest(step: Step, car: Car, n: int, pause: float) -> None:
        step.wait(pause)

    @leg.step
    def arrive(step: Step, car: Car, n: int, pause: float) -> None:
        car.note(f"leg{n}")
        car.mileage += 10

    trip = app.stepped_action("trip", actor=Car)

    @trip.step
    def depart(step: Step, car: Car, legs: int, pause: float) -> None:
        for n in range(legs):
            step.do(leg, n, pause)

    @trip.step
    def home(step: Step, car: Car, legs: int, pause: float) -> None:
        car.note("home")

    return trip, leg


@pytest.fixture
def garage(stepped: Stepped) -> Garage:
    """The module's actions on the test's app."""
    app = stepped.app
    trip, leg = define_trip(app)
    service = app.stepped_action(
        "service", actor=Car, outbound=True, concurrency_key=lambda car, label: ["Car", "bay"]
    )

    @service.step
    def open_bay(step: Step, car: Car, label: str) -> None:
        car.note(label)

    @app.task(name="tests.in_process.tow_task", shared=False)
    def tow_task(action_id: int) -> None:
        action = stepped.get_action(action_id)
        stepped.complete(action, "succeeded" if action.arguments == ["home"] else "failed")

    tow = app.stepped_action("tow", actor=Car, job=tow_task)
    return Garage(trip, leg, service, tow, tow_task)


@pytest.fixture
def worker(garage: Garage, stepped_worker: Any) -> Any:
    """The plugin's in-process worker, started once the actions are defined."""
    return stepped_worker


def test_the_worker_consumes_steppeds_queue_and_the_default_one(
    stepped: Stepped, worker: Any
) -> None:
    consumed = {q.name for q in stepped.app.amqp.queues.consume_from.values()}
    assert consumed == {"stepped", "celery"}
    assert worker_queues(stepped, "body, stepped") == ["stepped", "celery", "body"]


def test_a_tree_completes_through_the_broker(stepped: Stepped, worker: Any, garage: Garage) -> None:
    car = make_car(stepped)
    root = wait_status(stepped, root_id(stepped, garage.trip.later(car, 3, 0.1).id))
    assert root.status == "succeeded"
    assert [s.status for s in root.steps] == ["succeeded", "succeeded"]
    legs = root.steps[0].actions
    assert sorted(a.arguments[0] for a in legs) == [0, 1, 2]
    assert {a.status for a in legs} == {"succeeded"}
    stored = load_car(stepped, car.id)
    assert stored.mileage == 30
    assert sorted(stored.log.split(";")[:3]) == ["leg0", "leg1", "leg2"]
    assert stored.log.endswith("home;")
    assert stepped.lanes.count() == 0


def test_a_lane_supersedes_its_older_pending_action(
    stepped: Stepped, worker: Any, garage: Garage
) -> None:
    car = make_car(stepped)
    first = wait_status(stepped, root_id(stepped, garage.service.later(car, "a").id), "performing")
    assert [s.status for s in first.steps] == ["succeeded"]  # it began with its step
    older = root_id(stepped, garage.service.later(car, "b").id)
    wait_status(stepped, older, "pending")
    newer = root_id(stepped, garage.service.later(car, "c").id)
    superseded = wait_status(stepped, older, "superseded")
    assert superseded.superseded_by_id == newer
    lane = stepped.lanes.get("Car/bay")
    assert lane is not None and (lane.current_id, lane.pending_ids) == (first.id, [newer])
    assert stepped.complete(first.id) is not None
    promoted = wait_status(stepped, newer, "performing")
    # Handed on, it begins with its first step: no commit shows it performing without
    # one (completed from outside in between, its steps would never run).
    assert [s.status for s in promoted.steps] == ["succeeded"]
    stepped.complete(newer)
    assert wait_status(stepped, newer).status == "succeeded"
    assert load_car(stepped, car.id).log == "a;c;"
    assert stepped.lanes.count() == 0


def test_a_job_runs_on_the_apps_default_queue(
    stepped: Stepped, worker: Any, garage: Garage
) -> None:
    car = make_car(stepped)
    home = wait_status(stepped, root_id(stepped, garage.tow.later(car, "home").id))
    away = wait_status(stepped, root_id(stepped, garage.tow.later(car, "away").id))
    assert (home.status, away.status) == ("succeeded", "failed")
