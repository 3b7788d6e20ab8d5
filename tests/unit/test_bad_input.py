"""Bad input gets a clear error, and nothing is left stuck (issue 15, item 2)."""

from __future__ import annotations

import logging

import pytest
from celery import Celery

from celery_stepped import ActorNotFound, Stepped
from celery_stepped.models import Action
from celery_stepped.tasks import _check_content
from tests.models import Car


def test_steppeds_own_records_are_not_actor_types(stepped: Stepped, car: Car) -> None:
    for name in ("Action", "Step", "Achievement", "ParentLink", "OutboxEntry"):
        with pytest.raises(ActorNotFound, match=name):
            stepped.actors.resolve(name)
    assert stepped.actors.resolve("Car").cls is Car
    record = Action(name="x", actor_type="Car", actor_id="1", concurrency_key="k")
    assert not stepped.actors.is_actor(record)
    with pytest.raises(TypeError, match="is not an actor"):
        stepped.actors.identify(record)


def test_a_worker_that_accepts_pickle_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    app = Celery("pickled", set_as_current=False)
    caplog.set_level(logging.WARNING, logger="celery_stepped")
    app.conf.accept_content = ["json"]
    _check_content(app)
    assert caplog.records == []
    app.conf.accept_content = ["json", "pickle"]
    _check_content(app)
    (record,) = caplog.records
    assert "accepts pickle" in record.getMessage()


@pytest.mark.parametrize("timeout", [-5, 0, 0.0])
def test_a_timeout_must_be_positive(stepped: Stepped, timeout: float) -> None:
    with pytest.raises(ValueError, match="more than 0 seconds"):
        stepped.app.stepped_action("late", actor=Car, timeout=timeout)


def test_a_forged_wait_naming_a_child_actions_link_is_ignored(
    stepped: Stepped, car: Car, caplog: pytest.LogCaptureFixture
) -> None:
    from typing import Any

    from celery_stepped.messages import wait_message
    from celery_stepped.testing import perform_stepped_actions

    app = stepped.app

    @app.stepped_action(outbound=True)
    def approve(car: Car) -> None:
        pass

    @app.stepped_action
    def service(step: Any, car: Car) -> None:
        step.do(approve)

    with stepped.capture():
        root = service.now(car)
        perform_stepped_actions(stepped)  # approve performs, waiting to be completed
        (step,) = stepped.get_action(root.id).steps
        (child,) = step.actions
        link_id = _link_of(stepped, step.id)
        stepped.core.run_message(wait_message(link_id, 0))  # forged: not a wait
        assert stepped.get_action(root.id).steps[0].pending_actions_count == 1
        assert stepped.get_action(child.id).status == "performing"
        assert any("ignored" in r.getMessage() for r in caplog.records)
        stepped.complete(child.id)
        perform_stepped_actions(stepped)
    assert stepped.get_action(root.id).status == "succeeded"


def _link_of(stepped: Stepped, step_id: int) -> int:
    from sqlalchemy import select

    from celery_stepped.models import ParentLink

    with stepped.session() as s:
        return int(s.scalar(select(ParentLink.id).where(ParentLink.step_id == step_id)))


def _nested(levels: int) -> list[object]:
    value: list[object] = []
    for _ in range(levels):
        value = [value]
    return value


def test_arguments_nested_too_deep_are_refused_at_call_time(stepped: Stepped, car: Car) -> None:
    @stepped.app.stepped_action
    def carry(car: Car, load: object) -> None:
        pass

    with pytest.raises(TypeError, match="nest deeper than 32 levels"):
        carry.later(car, _nested(500))
    with stepped.capture() as jobs:
        carry.later(car, _nested(10))  # fine
        assert len(jobs.enqueued) == 1


@pytest.mark.parametrize(
    ("task", "args"),
    [
        ("stepped.start", ()),
        ("stepped.start", ({"actor": "Car/1", "name": "x"},)),
        ("stepped.start", ({"actor": ["Car", "1"], "name": "x", "link": "7"},)),
        ("stepped.start", ({"actor": ["Car", "1"], "name": "x", "link": 7, "ancestry": "1"},)),
        ("stepped.start", ({"actor": ["Car", "1"], "name": "x", "ancestry": ",1,') --"},)),
        ("stepped.resume", ("12",)),
        ("stepped.resume", (12, 13)),
        ("stepped.advance", (None,)),
        ("stepped.wait", (-1,)),
        ("stepped.timeout", (True,)),
        ("stepped.complete", (5, "done")),
        ("stepped.complete", (5,)),
        ("stepped.advance", (_nested(500),)),
    ],
)
def test_malformed_internal_messages_are_invalid(task: str, args: tuple[object, ...]) -> None:
    from celery_stepped.validation import InvalidMessage, check_message

    with pytest.raises(InvalidMessage):
        check_message(task, args)


def test_well_formed_internal_messages_pass() -> None:
    from celery_stepped.validation import check_message

    start = {"actor": ["Car", "1"], "name": "x", "args": [1], "link": None, "request": "r"}
    check_message("stepped.start", (start,))
    check_message("stepped.start", ({**start, "link": 7, "ancestry": ",3,12,"},))
    check_message("stepped.resume", (12,))
    check_message("stepped.complete", (None, "succeeded"))
    check_message("stepped.complete", (["Car", "1"], "charge", "failed"))


def test_completing_an_unknown_action_says_so(stepped: Stepped) -> None:
    from celery_stepped import ActionNotFound

    with pytest.raises(ActionNotFound, match="999999"):
        stepped.complete(999999)
    with pytest.raises(ValueError, match="status must be one of"):
        stepped.complete(1, "exploded")


@pytest.mark.parametrize("key", [5, 2.5, {"lane": 1}, ["a", None], True])
def test_keys_of_the_wrong_type_are_refused_at_definition(stepped: Stepped, key: object) -> None:
    with pytest.raises(TypeError, match="concurrency_key takes a string"):
        stepped.app.stepped_action("wash", actor=Car, concurrency_key=key)
    with pytest.raises(TypeError, match="checksum_key takes a string"):
        stepped.app.stepped_action("dry", actor=Car, checksum_key=key)


def test_an_actor_deleted_while_its_action_waits_fails_it_and_frees_the_lane(
    stepped: Stepped, car: Car
) -> None:
    from typing import Any

    from sqlalchemy import delete

    from celery_stepped.testing import perform_stepped_actions
    from tests.conftest import make_car

    app = stepped.app
    other = make_car(stepped)

    @app.stepped_action(outbound=True, concurrency_key="booth")
    def hold(car: Car) -> None:
        pass

    @app.stepped_action(concurrency_key="booth")
    def paint(car: Car) -> None:
        car.honk()

    @paint.failed
    def note(action: Any, car: Car) -> None:
        car.note("failed")

    with stepped.capture():
        held = hold.now(other)
        queued = paint.now(car)  # waits behind the hold
        with stepped.session() as s:
            s.execute(delete(Car).where(Car.id == car.id))  # the actor is gone
        stepped.complete(held.id)
        perform_stepped_actions(stepped)
    done = stepped.get_action(queued.id)
    assert done.status == "failed"
    (step,) = done.steps
    assert step.error is not None and step.error["type"] == "ActorNotFound"
    assert f"Car/{car.id} does not exist" in step.error["message"]
    assert done.after_callbacks_failed_count == 1  # nothing to call it on
    assert stepped.lanes.get("booth") is None  # the lane moved on


def test_a_wrong_number_of_arguments_is_refused_at_call_time(stepped: Stepped, car: Car) -> None:
    from typing import Any

    app = stepped.app

    @app.stepped_action
    def trip(step: Any, car: Car, miles: int) -> None:
        pass

    @app.stepped_action
    def wash(car: Car, soap: str = "mild") -> None:
        pass

    with stepped.capture() as jobs:
        with pytest.raises(
            TypeError, match=r"trip: step trip\(step.*missing a required argument: 'miles'"
        ):
            trip.later(car)
        with pytest.raises(TypeError, match="too many"):
            trip.later(car, 5, 6)
        with pytest.raises(TypeError, match="wash"):
            wash.now(car, "strong", "extra")
        assert jobs.enqueued == []  # nothing was sent
        trip.later(car, 5)
        wash.later(car)
        assert len(jobs.enqueued) == 2
