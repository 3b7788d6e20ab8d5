"""Semantics that follow the Ruby engine Stepped Actions (issue 11).

Each test says whether it keeps Stepped's choice or where celery_stepped differs.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from celery.result import AsyncResult
from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError

from celery_stepped import Step, Stepped, StepStatus, UnknownAction
from celery_stepped.models import Action, ParentLink
from celery_stepped.models import Step as StepRow
from celery_stepped.rendering import tree_lines
from celery_stepped.testing import handle_stepped_action_exceptions, perform_stepped_actions
from celery_stepped.views import action_tree
from tests.conftest import load_car, make_car, stored_actions
from tests.models import Car, SportsCar

# -- 1. current_step_index ------------------------------------------------------------------


def test_current_step_index_stays_at_the_last_step_performed(stepped: Stepped, car: Car) -> None:
    """As in Stepped: the index of the step performing, or of the last one that ran;
    never past the last step (a one-step action ends at 0)."""
    app = stepped.app
    honk = app.stepped_action("honk", actor=Car)
    trip = app.stepped_action("trip", actor=Car)

    @trip.step
    def leave(step: Step, car: Car) -> None:
        car.note("left")

    @trip.step
    def arrive(step: Step, car: Car) -> None:
        step.do("honk")

    with stepped.capture():
        one = honk.now(car)
        assert (one.status, one.current_step_index) == ("succeeded", 0)
        root = trip.now(car)
        assert (root.status, root.current_step_index) == ("performing", 1)
        perform_stepped_actions(stepped)
    done = stepped.get_action(root.id)
    assert (done.status, done.current_step_index) == ("succeeded", 1)
    assert [s.definition_index for s in done.steps] == [0, 1]


def test_a_failed_step_keeps_its_index(stepped: Stepped, car: Car) -> None:
    """As in Stepped: the action fails at the step that failed; later steps never run."""
    wreck = stepped.app.stepped_action("wreck", actor=Car)

    @wreck.step
    def crash(step: Step, car: Car) -> None:
        raise ValueError("crash")

    @wreck.step
    def never(step: Step, car: Car) -> None:
        car.note("never")

    with stepped.capture(), handle_stepped_action_exceptions(stepped):
        action = wreck.now(car)
    assert (action.status, action.current_step_index) == ("failed", 0)
    assert [(s.definition_index, s.status) for s in action.steps] == [(0, "failed")]


def test_an_outbound_action_is_ready_once_its_last_step_closed(stepped: Stepped, car: Car) -> None:
    """The readers of the index (perform_stepped_actions, repair) recognise a closed
    last step: the outbound action is offered for completion only then, and repair
    sees nothing stalled."""
    charge = stepped.app.stepped_action("charge", actor=Car, outbound=True)
    stepped.app.stepped_action("honk", actor=Car)

    @charge.step
    def ask(step: Step, car: Car) -> None:
        car.note("asked")

    @charge.step
    def remind(step: Step, car: Car) -> None:
        step.do("honk")

    offered: list[list[tuple[int, str]]] = []

    def complete(action: Action) -> str:
        steps = stepped.get_action(action.id).steps
        offered.append([(s.definition_index, s.status) for s in steps])
        assert stepped.repair().lines == []  # waiting to be completed is not stalled
        return "succeeded"

    with stepped.capture():
        action = charge.now(car)
        assert (action.status, action.current_step_index) == ("performing", 1)
        perform_stepped_actions(stepped, complete_outbound=complete)
    assert offered == [[(0, "succeeded"), (1, "succeeded")]]
    done = stepped.get_action(action.id)
    assert (done.status, done.current_step_index) == ("succeeded", 1)


def test_repair_finds_a_performing_action_whose_last_step_closed(
    stepped: Stepped, car: Car
) -> None:
    """A non-outbound action whose last step closed but that never completed (a crash
    between the two) is recognised as done at its index, and resumed to completion."""
    honk = stepped.app.stepped_action("honk", actor=Car)
    with stepped.capture():
        action = honk.now(car)
        with stepped.session() as session:
            session.get_one(Action, action.id).status = "performing"
        report = stepped.repair(apply=True)
        assert [r.reason for r in report.resends] == [
            "honk: every step done, the action never completed"
        ]
        perform_stepped_actions(stepped)
    assert stepped.get_action(action.id).status == "succeeded"
    assert [s.status for s in stepped.get_action(action.id).steps] == [StepStatus.SUCCEEDED]


# -- 6. complete_later resolves the action when its message runs ---------------------------


def define_charge(stepped: Stepped) -> Any:
    charge = stepped.app.stepped_action("charge", actor=Car, outbound=True)

    @charge.step
    def ask(step: Step, car: Car) -> None:
        car.note("asked")

    return charge


def test_complete_later_finds_the_action_performing_when_its_message_runs(
    stepped: Stepped, car: Car
) -> None:
    """As in Stepped (whose complete_later job looks the action up when it performs):
    ``charge.later(car); charge.complete_later(car)`` completes the charge even though
    it was not performing when complete_later was called."""
    charge = define_charge(stepped)
    with stepped.capture() as jobs:
        charge.later(car)
        result = charge.complete_later(car, status="failed")
        assert isinstance(result, AsyncResult)
        assert stored_actions(stepped, "charge") == []  # nothing started yet
        assert [(j.kind, j.name, j.args) for j in jobs.enqueued] == [
            ("action", "charge", []),
            ("complete", "charge", ["failed"]),
        ]
        (message,) = [m for m in jobs.messages if m.kind == "complete"]
        assert message.args == [["Car", str(car.id)], "charge", "failed"]  # no action id
        perform_stepped_actions(stepped)
    (action,) = stored_actions(stepped, "charge")
    assert action.status == "failed"
    assert load_car(stepped, car.id).log == "asked;"
    assert stepped.lanes.count() == 0


def test_complete_later_with_nothing_performing_then_is_a_logged_no_op(
    stepped: Stepped, car: Car, caplog: pytest.LogCaptureFixture
) -> None:
    """The API's "no such action: a no-op" is decided when the message runs: the call
    returns its AsyncResult, the message changes nothing and says so in the log."""
    charge = define_charge(stepped)
    with stepped.capture():
        first = charge.now(car)
        assert charge.complete_later(car) is not None
        stepped.complete(first.id, "cancelled")  # gone before the message runs
        with caplog.at_level(logging.INFO, logger="celery_stepped"):
            perform_stepped_actions(stepped)
    assert stepped.get_action(first.id).status == "cancelled"
    assert f"no performing outbound action charge on Car/{car.id}" in caplog.text


def test_complete_messages_of_earlier_versions_name_the_action(stepped: Stepped, car: Car) -> None:
    """``stepped.complete`` still accepts ``[action_id, status]`` (messages already
    queued when a worker is upgraded)."""
    charge = define_charge(stepped)
    with stepped.capture():
        action = charge.now(car)
        stepped.app.tasks["stepped.complete"].apply(args=[action.id, "cancelled"])
        perform_stepped_actions(stepped)
        stepped.app.tasks["stepped.complete"].apply(args=[None, "failed"])  # a no-op
    assert stepped.get_action(action.id).status == "cancelled"
    assert stepped.lanes.count() == 0


# -- 7. implicit actions: a method of the actor ---------------------------------------------


def test_step_do_with_a_method_name_runs_an_implicit_one_step_action(
    stepped: Stepped, car: Car
) -> None:
    """As in Stepped's registry: ``step.do("honk")`` with no declared ``honk`` runs
    ``car.honk()`` as a one-step child action; ``step.do`` of a name that is neither
    still raises UnknownAction at once, inside the body."""
    trip = stepped.app.stepped_action("trip", actor=Car)
    refused: list[BaseException] = []

    @trip.step
    def leave(step: Step, car: Car) -> None:
        step.do("honk")
        step.on([car, None], "note", "waved")
        try:
            step.do("fly")
        except UnknownAction as exc:
            refused.append(exc)

    with stepped.capture():
        root = trip.now(car)
        perform_stepped_actions(stepped)
    assert stepped.get_action(root.id).status == "succeeded"
    assert [(a.name, a.status, a.current_step_index) for a in stored_actions(stepped)[1:]] == [
        ("honk", "succeeded", 0),
        ("note", "succeeded", 0),
    ]
    stored = load_car(stepped, car.id)
    assert (stored.honks, stored.log) == (1, "waved;")
    assert len(refused) == 1 and "fly" in str(refused[0])


def test_a_name_dispatches_to_the_implicit_action_of_an_actor_without_one(
    stepped: Stepped, car: Car
) -> None:
    """``honk.now(car)`` dispatches by name: with ``honk`` declared for SportsCar only,
    a plain Car runs its own ``honk`` method; a name that is neither raises."""
    sports_honk = stepped.app.stepped_action("honk", actor=SportsCar)

    @sports_honk.step
    def loud(step: Step, car: Car) -> None:
        car.note("loud")

    for neither in ("fly", "mileage", "mro", "_sa_instance_state", "__init__"):
        with pytest.raises(UnknownAction):
            stepped.registry.find(Car, neither)  # no method: a column, type's, private
    with stepped.capture():
        action = sports_honk.now(car)
        assert (action.status, action.name) == ("succeeded", "honk")
        sports = make_car(stepped, SportsCar)
        sports_honk.now(sports)
        with pytest.raises(UnknownAction):
            stepped.client.start_now("fly", car, [])
    assert load_car(stepped, car.id).honks == 1
    assert (load_car(stepped, sports.id).honks, load_car(stepped, sports.id).log) == (0, "loud;")


def test_an_implicit_action_never_shadows_a_later_declared_one(stepped: Stepped, car: Car) -> None:
    """The implicit definition is cached on first lookup; declaring the name later
    wins, for lookups and for the Celery task of that name."""
    implicit = stepped.registry.find(Car, "honk")
    assert implicit.implicit and stepped.registry.find(Car, "honk") is implicit
    assert stepped.app.tasks["stepped.action.honk"] is implicit
    with stepped.capture():
        implicit.now(car)
        declared = stepped.app.stepped_action("honk", actor=Car)

        @declared.step
        def twice(step: Step, car: Car) -> None:
            car.honk()
            car.honk()

        assert stepped.registry.find(Car, "honk") is declared
        assert stepped.app.tasks["stepped.action.honk"] is declared
        implicit.now(car)  # dispatches by name: the declared definition runs
    assert load_car(stepped, car.id).honks == 3


# -- 8. step.status = "failed" still starts the step's children -----------------------------


def test_a_step_failed_by_its_body_still_runs_its_children_then_fails(
    stepped: Stepped, car: Car
) -> None:
    """As in Stepped: ``step.status = "failed"`` keeps the children the body asked
    for; they run, the step is ``failed`` from the start, and it closes (failing its
    action, later steps never run) only once they are all final."""
    charge = define_charge(stepped)
    stepped.app.stepped_action("honk", actor=Car)
    trip = stepped.app.stepped_action("trip", actor=Car)

    @trip.step
    def leave(step: Step, car: Car) -> None:
        step.do("honk")
        step.do(charge)
        step.status = "failed"

    @trip.step
    def never(step: Step, car: Car) -> None:
        car.note("never")

    with stepped.capture():
        root = trip.now(car)
        assert root.status == "performing"
        assert [(s.status, s.pending_actions_count) for s in root.steps] == [("failed", 2)]
        assert root.steps[0].completed_at is None
        perform_stepped_actions(stepped)
        waiting = stepped.get_action(root.id)
        assert waiting.status == "performing"  # the outbound charge is still open
        assert [(s.status, s.pending_actions_count) for s in waiting.steps] == [("failed", 1)]
        assert stepped.repair().lines == []  # an open failed step is not stalled
        lines = tree_lines(action_tree(stepped, root.id))
        assert lines[1].startswith("└─ step 1/2 leave: failed, waiting on 1 of 2")
        assert charge.complete_now(car) is not None
        perform_stepped_actions(stepped)
    done = stepped.get_action(root.id)
    assert done.status == "failed"
    assert [(s.status, s.unsuccessful_actions_count) for s in done.steps] == [("failed", 0)]
    assert done.steps[0].completed_at is not None
    assert [(a.name, a.status) for a in done.steps[0].actions] == [
        ("honk", "succeeded"),
        ("charge", "succeeded"),
    ]
    stored = load_car(stepped, car.id)
    assert (stored.honks, stored.log) == (1, "asked;")


def test_a_step_failed_by_its_body_without_children_fails_at_once(
    stepped: Stepped, car: Car
) -> None:
    """As in Stepped: with nothing to wait on the step closes failed in the body's run."""
    wreck = stepped.app.stepped_action("wreck", actor=Car)

    @wreck.step
    def give_up(step: Step, car: Car) -> None:
        car.note("gave up")
        step.status = "failed"

    with stepped.capture() as jobs:
        action = wreck.now(car)
        assert jobs.enqueued == []
    assert (action.status, [s.status for s in action.steps]) == ("failed", ["failed"])
    assert load_car(stepped, car.id).log == "gave up;"


# -- 5. before: any final status ends the action --------------------------------------------


@pytest.mark.parametrize("status", ["failed", "cancelled", "succeeded", "timed_out"])
def test_a_final_status_set_in_before_ends_the_action(
    stepped: Stepped, car: Car, status: str
) -> None:
    """As in Stepped (``completed?`` after the before chain): ``action.status = ...``
    with any final status ends the action like ``cancel()``/``complete()``: it is not
    persisted, its parent step hears the outcome, and its lane stays free."""
    guarded = stepped.app.stepped_action("guarded", actor=Car, concurrency_key="booth")
    trip = stepped.app.stepped_action("trip", actor=Car)

    @guarded.before
    def stop(action: Action, car: Car) -> None:
        car.note("before")
        if not car.honks:
            action.status = status

    @guarded.step
    def go(step: Step, car: Car) -> None:
        car.note("step")

    @trip.step
    def leave(step: Step, car: Car) -> None:
        step.do(guarded)

    with stepped.capture():
        alone = guarded.now(car)
        assert (alone.id, alone.status, alone.completed) == (None, status, True)
        root = trip.now(car)
        perform_stepped_actions(stepped)
        assert stepped.lanes.get("booth") is None
        assert [a.name for a in stored_actions(stepped)] == ["trip"]
        with stepped.session() as session:
            session.get_one(Car, car.id).honks = 1  # before lets it go on now
        assert guarded.now(car).status == "succeeded"  # the lane was never held
    assert stepped.get_action(root.id).status == (
        "succeeded" if status == "succeeded" else "failed"
    )
    assert load_car(stepped, car.id).log == "before;before;before;step;"


def test_a_non_final_status_set_in_before_is_not_kept(stepped: Stepped, car: Car) -> None:
    """Only a final status ends the action; ``performing`` set in before is ignored and
    the action enters its lane as usual."""
    odd = stepped.app.stepped_action("odd", actor=Car)

    @odd.before
    def meddle(action: Action, car: Car) -> None:
        action.status = "performing"

    @odd.step
    def go(step: Step, car: Car) -> None:
        car.note("step")

    with stepped.capture():
        action = odd.now(car)
    assert action.status == "succeeded" and action.id is not None
    assert load_car(stepped, car.id).log == "step;"


def define_guarded(stepped: Stepped, stop: bool) -> tuple[Any, Any]:
    guarded = stepped.app.stepped_action("guarded", actor=Car)
    trip = stepped.app.stepped_action("trip", actor=Car)

    @guarded.before
    def check(action: Action, car: Car, miles: int) -> None:
        car.note("before")
        action.arguments = [miles * 2]
        if stop:
            action.status = "cancelled"

    @guarded.step
    def go(step: Step, car: Car, miles: int) -> None:
        car.mileage += miles

    @trip.step
    def leave(step: Step, car: Car) -> None:
        step.do(guarded, 5)

    return guarded, trip


@pytest.mark.parametrize("stop", [False, True], ids=["goes-on", "cancelled"])
@pytest.mark.parametrize("child", [False, True], ids=["root", "child"])
def test_before_runs_once_when_the_start_message_is_delivered_twice(
    stepped: Stepped, car: Car, stop: bool, child: bool
) -> None:
    """Stepped runs ``before`` once per start job; Celery's late acks may deliver a
    start message twice, so what ``before`` decided (arguments, a final status) is
    recorded and replayed, also for a root that ``before`` ended (no action row)."""
    guarded, trip = define_guarded(stepped, stop)
    with stepped.capture() as jobs:
        root = trip.now(car) if child else None
        if not child:
            guarded.later(car, 5)
        (start,) = jobs.take("action")
        for _ in range(3):
            stepped.core.run_message(start)
        perform_stepped_actions(stepped)
    stored = load_car(stepped, car.id)
    assert stored.log == "before;"
    assert stored.mileage == (0 if stop else 10)
    assert [a.status for a in stored_actions(stepped, "guarded")] == ([] if stop else ["succeeded"])
    if root is not None:
        expected = "failed" if stop else "succeeded"
        assert stepped.get_action(root.id).status == expected


def test_a_start_that_crashed_after_before_replays_it(
    stepped: Stepped, car: Car, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after ``before`` committed and before the action row was written: the
    redelivered message does not run ``before`` again (its record commits with it)."""
    guarded, _ = define_guarded(stepped, stop=False)

    class Crash(Exception):
        pass

    def crash(*_: Any) -> None:
        raise Crash

    with stepped.capture() as jobs:
        guarded.later(car, 5)
        (start,) = jobs.take("action")
        with monkeypatch.context() as patch:
            patch.setattr(stepped.core.starter, "create", crash)
            with pytest.raises(Crash):
                stepped.core.run_message(start)
        assert stored_actions(stepped, "guarded") == []
        stepped.core.run_message(start)
        perform_stepped_actions(stepped)
    (action,) = stored_actions(stepped, "guarded")
    assert (action.status, action.arguments) == ("succeeded", [10])
    assert (load_car(stepped, car.id).log, load_car(stepped, car.id).mileage) == ("before;", 10)


def test_two_deliveries_at_once_commit_the_changes_of_before_once(
    stepped: Stepped, car: Car
) -> None:
    """Two workers running the same start message at the same moment both run the
    hook's code, but only one commits its changes with the record; the other rolls
    back and replays it: on PostgreSQL the record's unique key decides, on SQLite the
    database lock already does (the loser's commit fails and Celery retries it)."""
    guarded = stepped.app.stepped_action("guarded", actor=Car)
    inside = threading.Barrier(2, timeout=10)
    calls: list[int] = []

    @guarded.before
    def check(action: Action, car: Car) -> None:
        calls.append(1)
        car.note("before")
        if len(calls) <= 2:
            inside.wait()  # both deliveries are in before at once

    @guarded.step
    def go(step: Step, car: Car) -> None:
        car.mileage += 1

    def deliver(start: Any, errors: list[BaseException]) -> None:
        for _ in range(20):  # Celery retries a task that met a locked database
            try:
                stepped.core.run_message(start)
                return
            except OperationalError:
                continue
            except BaseException as exc:
                errors.append(exc)
                return

    with stepped.capture() as jobs:
        guarded.later(car)
        (start,) = jobs.take("action")
        errors: list[BaseException] = []
        threads = [threading.Thread(target=deliver, args=(start, errors)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        perform_stepped_actions(stepped)
    assert len(calls) >= 2
    assert [a.status for a in stored_actions(stepped, "guarded")] == ["succeeded"]
    assert (load_car(stepped, car.id).log, load_car(stepped, car.id).mileage) == ("before;", 1)


def test_start_records_survive_trees_deleted_and_ids_reused(stepped: Stepped, car: Car) -> None:
    """A start's record is keyed by the request id its message carries (a child's comes
    from its parent link), never by a row id a database may hand out again after a
    user deleted old trees: a new tree's child runs its own ``before``."""
    _, trip = define_guarded(stepped, stop=False)
    with stepped.capture():
        first = trip.now(car)
        perform_stepped_actions(stepped)
        old_links = [link.id for link in stored_links(stepped)]
        with stepped.session() as session:
            for model in (ParentLink, StepRow, Action):
                session.execute(delete(model))
        second = trip.now(car)
        perform_stepped_actions(stepped)
    if stepped.engine.dialect.name == "sqlite":  # SQLite hands the same ids out again
        assert [link.id for link in stored_links(stepped)] == old_links
        assert first.id == second.id
    assert stepped.get_action(second.id).status == "succeeded"
    stored = load_car(stepped, car.id)
    assert (stored.log, stored.mileage) == ("before;before;", 20)


def stored_links(stepped: Stepped) -> list[ParentLink]:
    with stepped.session() as session:
        links = list(session.scalars(select(ParentLink).order_by(ParentLink.id)).all())
        session.expunge_all()
    return links
