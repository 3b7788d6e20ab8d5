"""A step whose members all reported closes in its next body's transaction (issue 12).

Advancing a step that will succeed and has a next one writes the close with the next
body's writes and ``Step`` row: one commit. These tests pin what must not change: the
order of the signals, a failing step never runs the next body, a failing next body
still closes the step before it, and a second advance of the same step runs nothing.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event, select

from celery_stepped import Step, Stepped, beginning, signals
from celery_stepped.models import Step as StepRow
from celery_stepped.testing import perform_stepped_actions
from tests.conftest import load_car
from tests.models import Car


def steps_of(stepped: Stepped, action_id: int) -> list[tuple[int, str]]:
    with stepped.session() as session:
        rows = session.execute(
            select(StepRow.definition_index, StepRow.status)
            .where(StepRow.action_id == action_id)
            .order_by(StepRow.definition_index)
        )
        return [(index, status) for index, status in rows]


def define(stepped: Stepped, child_fails: bool = False, second_fails: bool = False) -> Any:
    """``tour``: step 1 starts ``stop`` (a child), step 2 notes "second" (or raises)."""
    app = stepped.app

    @app.stepped_action(actor=Car)
    def stop(c: Car) -> None:
        if child_fails:
            raise ValueError("flat tyre")
        c.note("stop")

    tour = app.stepped_action("tour", actor=Car)

    @tour.step
    def first(step: Step, c: Car) -> None:
        step.do(stop)

    @tour.step
    def second(step: Step, c: Car) -> None:
        if second_fails:
            raise ValueError("no road")
        c.note("second")

    return tour


def test_the_next_step_is_written_with_the_close_of_the_one_before(
    stepped: Stepped, car: Car
) -> None:
    tour = define(stepped)
    seen: list[tuple[str, list[tuple[int, str]]]] = []

    def completed(sender: Any = None, step_id: int = 0, status: str = "", **_: Any) -> None:
        with stepped.session() as session:
            step = session.get(StepRow, step_id)
            if step is None or step.action_id != tour_id[0]:
                return  # the child's step
        seen.append((status, steps_of(stepped, tour_id[0])))

    tour_id: list[int] = []
    signals.step_completed.connect(completed)
    try:
        with stepped.capture():
            action = tour.now(car)
            tour_id.append(action.id)
            perform_stepped_actions(stepped)
    finally:
        signals.step_completed.disconnect(completed)
    assert stepped.get_action(action.id).status == "succeeded"
    # Step 1's signal comes after the commit that closed it: step 2 was in that commit.
    assert seen[0] == ("succeeded", [(0, "succeeded"), (1, "succeeded")])
    assert len(seen) == 2  # and step 2's own
    assert load_car(stepped, car.id).log == "stop;second;"


def test_a_step_whose_member_failed_fails_its_action_without_the_next_body(
    stepped: Stepped, car: Car
) -> None:
    tour = define(stepped, child_fails=True)
    with stepped.capture():
        action = tour.now(car)
        perform_stepped_actions(stepped)
    assert stepped.get_action(action.id).status == "failed"
    assert steps_of(stepped, action.id) == [(0, "failed")]
    assert load_car(stepped, car.id).log == ""


def test_a_failing_next_body_still_closes_the_step_before_it(stepped: Stepped, car: Car) -> None:
    tour = define(stepped, second_fails=True)
    with stepped.capture():
        action = tour.now(car)
        perform_stepped_actions(stepped)
    assert stepped.get_action(action.id).status == "failed"
    assert steps_of(stepped, action.id) == [(0, "succeeded"), (1, "failed")]
    assert load_car(stepped, car.id).log == "stop;"


def test_advancing_a_step_again_runs_nothing_again(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    runs: list[str] = []

    @app.stepped_action(actor=Car, outbound=True)
    def hold(c: Car) -> None:
        """Performs until completed from outside."""

    trip = app.stepped_action("trip", actor=Car)

    @trip.step
    def go(step: Step, c: Car) -> None:
        step.do(hold)

    @trip.step
    def wait_again(step: Step, c: Car) -> None:
        runs.append("second")
        step.do(hold)  # waits: the step stays open

    with stepped.capture():
        action = trip.now(car)
        perform_stepped_actions(stepped)
        hold.complete_now(car)
        perform_stepped_actions(stepped)
        (first_id,) = [s.id for s in stepped.get_action(action.id).steps if s.definition_index == 0]
        for _ in range(2):  # a redelivered advance of the step already closed
            stepped.core.advance_step(first_id)
    assert runs == ["second"]
    assert steps_of(stepped, action.id) == [(0, "succeeded"), (1, "performing")]


def test_the_next_body_gets_its_action_from_the_read_that_found_the_step_closing(
    stepped: Stepped, car: Car
) -> None:
    app = stepped.app
    seen: list[Any] = []

    @app.stepped_action(actor=Car)
    def stop(c: Car) -> None:
        c.note("stop")

    tour = app.stepped_action("tour", actor=Car)

    @tour.step
    def first(step: Step, c: Car, where: str) -> None:
        step.do(stop)

    @tour.step
    def second(step: Step, c: Car, where: str) -> None:
        action = step.action
        indexes = [row.definition_index for row in action.steps]
        seen.append((action.status, action.current_step_index, action.arguments, indexes))
        c.note(where)

    reads: list[str] = []

    def record(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        # The action read by itself (step_to_run), not the child's start reading its row.
        alone = statement.lstrip().startswith("SELECT stepped_actions.id, stepped_actions.name")
        if alone and "lane_performer" not in statement:
            reads.append(statement)

    with stepped.capture():
        action = tour.now(car, "home")
        event.listen(stepped.engine, "before_cursor_execute", record)
        try:
            perform_stepped_actions(stepped)  # the child, which advances the tour
        finally:
            event.remove(stepped.engine, "before_cursor_execute", record)
    assert stepped.get_action(action.id).status == "succeeded"
    assert load_car(stepped, car.id).log == "stop;home;"
    (status, index, arguments, indexes), *more = seen
    assert (status, index, indexes, more) == ("performing", 0, [0], [])
    assert "home" in str(arguments)
    # SQLite: the advance's read gave the row; PostgreSQL reads it with its row lock.
    assert len(reads) == (0 if stepped.engine.dialect.name == "sqlite" else 1)


def test_a_step_advanced_elsewhere_after_the_read_runs_its_next_step_once(
    stepped: Stepped, car: Car, monkeypatch: pytest.MonkeyPatch
) -> None:
    tour = define(stepped)
    original = beginning.Closing.attach
    raced: list[int] = []

    def racing(self: beginning.Closing, s: Any) -> Any:
        if not raced:  # another delivery advances the same step first, to the end
            raced.append(self.step_id)
            stepped.core.advance_step(self.step_id)
        return original(self, s)

    monkeypatch.setattr(beginning.Closing, "attach", racing)
    with stepped.capture():
        action = tour.now(car)
        perform_stepped_actions(stepped)
    assert len(raced) == 1
    assert stepped.get_action(action.id).status == "succeeded"
    assert steps_of(stepped, action.id) == [(0, "succeeded"), (1, "succeeded")]
    # The late one's body ran too, but its writes rolled back with its step's.
    assert load_car(stepped, car.id).log == "stop;second;"
