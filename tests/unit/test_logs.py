"""What a person running Stepped reads: one INFO line per transition, readable labels."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from celery_stepped import Stepped
from celery_stepped.messages import StartCall, advance_message, start_message
from celery_stepped.testing import perform_stepped_actions
from tests.models import Car


def test_each_transition_logs_one_info_line(
    stepped: Stepped, car: Car, caplog: pytest.LogCaptureFixture
) -> None:
    app = stepped.app

    @app.stepped_action
    def drive(car: Car, miles: int) -> None:
        car.mileage += miles

    @app.stepped_action
    def trip(step: Any, car: Car) -> None:
        step.do(drive, 5)

    caplog.set_level(logging.INFO, logger="celery_stepped")
    with stepped.capture():
        root = trip.now(car)
        perform_stepped_actions(stepped)
    (child,) = [a for s in stepped.get_action(root.id).steps for a in s.actions]
    lines = [r.getMessage() for r in caplog.records if r.name == "celery_stepped"]
    actor = f"Car/{car.id}"
    assert f"action #{root.id} trip on {actor}: pending -> performing" in lines
    assert f"action #{child.id} drive on {actor}: pending -> performing" in lines
    done = [line for line in lines if line.startswith(f"action #{root.id} trip on {actor}: perf")]
    assert len(done) == 1
    assert done[0].startswith(f"action #{root.id} trip on {actor}: performing -> succeeded in ")
    assert done[0].endswith("s")


def test_a_superseded_action_says_by_whom(
    stepped: Stepped, car: Car, caplog: pytest.LogCaptureFixture
) -> None:
    app = stepped.app

    @app.stepped_action(outbound=True, concurrency_key="shop")
    def hold(car: Car) -> None:
        pass

    @app.stepped_action(concurrency_key="shop")
    def paint(car: Car, color: str) -> None:
        pass

    caplog.set_level(logging.INFO, logger="celery_stepped")
    with stepped.capture():
        hold.now(car)
        old = paint.now(car, "red")
        new = paint.now(car, "blue")
    lines = [r.getMessage() for r in caplog.records if r.name == "celery_stepped"]
    assert f"action #{old.id}: pending -> superseded by #{new.id}" in lines


def test_messages_carry_a_readable_label() -> None:
    call = StartCall(["Car", "1"], "trip", [5, "north"])
    assert start_message(call).label() == "stepped.start trip(Car/1, 5, 'north')"
    assert advance_message(12).label() == "stepped.advance advance()"
    one = start_message(StartCall(["Car", "1"], "trip", ["x" * 500])).label()
    assert one == f"stepped.start trip(Car/1, '{'x' * 36}...)"  # each argument shortened
    many = start_message(StartCall(["Car", "1"], "trip", ["x" * 500] * 10)).label()
    assert len(many) == 200 and many.endswith("...")  # and the whole label
