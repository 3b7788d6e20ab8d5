"""The caller's side of ``now()``: what it reads, and what it hands back."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event, inspect

from celery_stepped import ActionStatus, Stepped, signals
from celery_stepped.models import Action
from celery_stepped.testing import perform_stepped_actions
from tests.conftest import load_car, stored_actions
from tests.models import Car


def _statements(stepped: Stepped) -> list[str]:
    seen: list[str] = []

    def record(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(stepped.engine, "before_cursor_execute", record)
    return seen


def test_keys_read_the_callers_actor_without_loading_it_again(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    key = {"concurrency_key": lambda c: ["lot", c.location]}

    @app.stepped_action(outbound=True, **key)
    def hold(c: Car) -> None:
        """Holds the lane until completed from outside."""

    @app.stepped_action(**key)
    def park(c: Car) -> None:
        """Waits behind ``hold``."""

    car.location = "north"  # the caller's object: keys see it as given
    with stepped.capture():
        hold.now(car)  # holds the lane: park waits, its steps do not run here
        seen = _statements(stepped)
        action = park.now(car)
    assert (action.concurrency_key, action.status) == ("lot/north", "pending")
    assert not [s for s in seen if "FROM cars" in s]


def test_keys_load_a_detached_actor_whose_attributes_expired(stepped: Stepped, car: Car) -> None:
    app = stepped.app

    @app.stepped_action(concurrency_key=lambda c: ["lot", c.mileage])
    def park(c: Car) -> None:
        """One step."""

    with stepped.session() as session:
        stale = session.get(Car, car.id)
        assert stale is not None
        stale.mileage = 70
        session.commit()  # expires it; closing the session detaches it
    with stepped.capture():
        action = park.now(stale)
    assert action.concurrency_key == "lot/70"
    assert load_car(stepped, car.id).mileage == 70


def test_now_of_a_waiting_action_hands_back_no_steps_and_a_performing_one_its_steps(
    stepped: Stepped, car: Car
) -> None:
    app = stepped.app

    @app.stepped_action(outbound=True, concurrency_key="shop")
    def hold(c: Car) -> None:
        """Holds the lane until completed from outside."""

    wash = app.stepped_action("wash", actor=Car, concurrency_key="shop")

    @wash.step
    def soap(step: Any, c: Car) -> None:
        """One step."""

    with stepped.capture():
        held = hold.now(car)
        waiting = wash.now(car)
    assert (held.status, len(held.steps)) == (ActionStatus.PERFORMING, 1)
    assert (waiting.status, waiting.steps, waiting.parent_steps) == ("pending", [], [])
    stored = stepped.get_action(waiting.id)  # the row as written, defaults included
    columns = [c.key for c in Action.__table__.columns]
    assert [getattr(waiting, c) for c in columns] == [getattr(stored, c) for c in columns]
    assert inspect(waiting).detached
    with stepped.session() as session:  # as any action handed out: detached, mergeable
        merged = session.merge(waiting)
        merged.arguments = ["merged"]
        session.commit()
    assert stepped.get_action(waiting.id).arguments == ["merged"]
    assert len(stored_actions(stepped, "wash")) == 1


def test_action_completed_names_the_root_request_it_read_with_the_status(
    stepped: Stepped, car: Car, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = stepped.app

    @app.stepped_action(outbound=True, concurrency_key="lot")
    def lot(c: Car) -> None:
        """Holds the lane until completed from outside."""

    seen: list[tuple[int, str, Any]] = []

    def receiver(sender: Any, action_id: int, status: str, **kw: Any) -> None:
        seen.append((action_id, status, kw.get("root", "unknown")))

    stored: list[tuple[str, str, int | None]] = []
    monkeypatch.setattr(stepped.report, "report", lambda *a: stored.append(a[:3]))
    seen_sql = _statements(stepped)
    signals.action_completed.connect(receiver, sender=stepped, weak=False)
    try:
        with stepped.capture():
            first = lot.now(car)  # performs: current
            second = lot.now(car)  # pending
            third = lot.now(car)  # supersedes the second
            result = lot.later(car)  # a root with a request id: supersedes the third
            perform_stepped_actions(stepped)
            stepped.complete(first.id, "succeeded")
            fourth = stepped.client.find_request(result.id)
            assert fourth is not None
            perform_stepped_actions(stepped)
            stepped.complete(fourth.id, "failed")
    finally:
        signals.action_completed.disconnect(receiver, sender=stepped)
    assert (second.id, "superseded", None) in seen
    assert (first.id, "succeeded", None) in seen
    assert (third.id, "superseded", None) in seen
    assert not [s for s in seen_sql if "request_id, stepped_actions.canvas \nFROM" in s]
    reported = [root for i, status, root in seen if i == fourth.id]
    assert reported == [(result.id, {})]
    assert stored == [(result.id, "failed", fourth.id)]  # reported once, with no query
