"""Stepped signatures and root calls take Celery's standard options (issue 13, item 1).

The start message is held by ``stepped.capture()``, so each test reads exactly what
would be published: its task id, countdown, expiry, priority, queue and the canvas
that travels with it. Then the held message runs, and the returned ``AsyncResult``
tracks the root action from SQL (no result backend here).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import states

from celery_stepped import ActionFailed, Stepped, SteppedError, SteppedSignature
from celery_stepped.messages import Message, TaskName
from celery_stepped.results import ActionResult
from tests.models import Car


def define(stepped: Stepped) -> tuple[Any, Any]:
    app = stepped.app

    @app.stepped_action
    def drive(car: Car, miles: int) -> None:
        car.mileage += miles

    @app.task(name="tests.unit.report", shared=False)
    def report(status: str) -> str:
        return status

    return drive, report


def held(stepped: Stepped, call: Any) -> tuple[Any, Message]:
    """Run ``call`` inside a capture; the result and the one start message it sent."""
    with stepped.capture() as jobs:
        result = call()
        messages = list(jobs.messages)
        jobs.messages.clear()
    assert [m.task for m in messages] == [TaskName.START]
    return result, messages[0]


def test_later_honours_countdown_task_id_expires_priority_and_queue(
    stepped: Stepped, car: Car
) -> None:
    drive, _ = define(stepped)
    result, message = held(
        stepped,
        lambda: drive.later(
            car, 5, countdown=10, task_id="req-1", expires=60, priority=3, queue="fleet"
        ),
    )
    assert isinstance(result, ActionResult)
    assert result.id == message.task_id == "req-1"
    assert message.countdown == 10
    assert message.expires == 60
    assert message.priority == 3
    assert message.queue == "fleet"
    assert message.args[0]["request"] == "req-1"


def test_a_signature_takes_options_in_later_apply_async_and_set(stepped: Stepped, car: Car) -> None:
    drive, _ = define(stepped)
    signature = drive.s(car, 5)
    assert isinstance(signature, SteppedSignature)

    _, message = held(stepped, lambda: signature.later(countdown=10))
    assert message.countdown == 10

    _, message = held(stepped, lambda: signature.apply_async(queue="fleet", priority=7))
    assert (message.queue, message.priority) == ("fleet", 7)

    routed = drive.s(car, 5).set(queue="fleet", countdown=4, task_id="req-set")
    result, message = held(stepped, routed.later)
    assert (message.queue, message.countdown, message.task_id) == ("fleet", 4, "req-set")
    assert result.id == "req-set"

    _, message = held(stepped, lambda: routed.apply_async())
    assert (message.queue, message.countdown) == ("fleet", 4)


def test_eta_becomes_the_time_left(stepped: Stepped, car: Car) -> None:
    drive, _ = define(stepped)
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    stepped.clock = lambda: now
    _, message = held(stepped, lambda: drive.later(car, 5, eta=now + timedelta(seconds=30)))
    assert message.countdown == 30
    _, message = held(stepped, lambda: drive.later(car, 5, expires=now + timedelta(minutes=2)))
    assert message.expires == 120


@pytest.mark.parametrize(
    "call",
    [
        lambda drive, car: drive.later(car, 5, countdwn=10),
        lambda drive, car: drive.apply_async((car, 5), retry_policy={}),
        lambda drive, car: drive.s(car, 5).later(serializer="pickle"),
        lambda drive, car: drive.s(car, 5).set(colour="red").apply_async(),
        lambda drive, car: drive.delay(car, miles=5),
    ],
)
def test_unknown_options_raise_type_error_and_send_nothing(
    stepped: Stepped, car: Car, call: Any
) -> None:
    drive, _ = define(stepped)
    with stepped.capture() as jobs, pytest.raises(TypeError):
        call(drive, car)
    assert jobs.enqueued == []


def test_link_and_link_error_travel_with_the_start_message(stepped: Stepped, car: Car) -> None:
    drive, report = define(stepped)
    _, message = held(
        stepped, lambda: drive.later(car, 5, link=report.s(), link_error=report.si("failed"))
    )
    canvas = message.args[0]["canvas"]
    assert [c["task"] for c in canvas["link"]] == ["tests.unit.report"]
    assert canvas["link_error"][0]["args"] == ["failed"]
    json.dumps(message.to_dict())  # the message and its callbacks are JSON


def test_a_signature_carries_its_actor_as_a_reference(stepped: Stepped, car: Car) -> None:
    drive, _ = define(stepped)
    signature = drive.s(car, 5)
    assert list(signature.args) == [{"__stepped_actor__": ["Car", str(car.id)]}, 5]
    assert json.loads(json.dumps(signature))["subtask_type"] == "stepped"

    # A parent's result comes after the actor; an immutable signature ignores it.
    @stepped.app.stepped_action
    def log_trip(car: Car, outcome: str, miles: int) -> None:
        pass

    taking = log_trip.s(car, 5)
    _, message = held(stepped, lambda: taking.apply_async(("succeeded",)))
    assert message.args[0]["args"] == ["succeeded", 5]
    _, message = held(stepped, lambda: drive.si(car, 5).apply_async(("succeeded",)))
    assert message.args[0]["args"] == [5]
    with pytest.raises(TypeError, match="too many positional arguments"):
        signature.apply_async(("succeeded",))  # drive(car, miles) takes no parent result
    rebuilt = SteppedSignature.from_dict(json.loads(json.dumps(signature)), app=stepped.app)
    assert isinstance(rebuilt.clone(), SteppedSignature)


def test_the_result_tracks_the_root_action_without_a_backend(stepped: Stepped, car: Car) -> None:
    drive, _ = define(stepped)
    with stepped.capture() as jobs:
        result = drive.s(car, 5).later()
        assert result.action_id is None
        assert result.state == states.PENDING
        jobs.perform_all()
    action = stepped.get_action(result.action_id)
    assert action.request_id == result.id
    assert action.status == "succeeded"
    assert result.state == states.SUCCESS


def test_action_failed_carries_status_and_action_id() -> None:
    error = ActionFailed("timed_out", 7)
    assert isinstance(error, SteppedError)
    assert (error.status, error.action_id) == ("timed_out", 7)
    assert "timed_out" in str(error)
    rebuilt = ActionFailed(*error.args)
    assert (rebuilt.status, rebuilt.action_id) == ("timed_out", 7)
