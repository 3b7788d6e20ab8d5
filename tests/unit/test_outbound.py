"""Outbound and job-backed actions, waits, timeouts, exceptions and redelivery."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from celery_stepped import ActionStatus, Step, Stepped, signals
from celery_stepped.messages import advance_message
from celery_stepped.models import Action, ParentLink
from celery_stepped.testing import handle_stepped_action_exceptions, perform_stepped_actions
from tests.conftest import load_car, make_car, stored_actions
from tests.models import Car


def define_outbound(stepped: Stepped, **options: Any) -> tuple[Any, Any]:
    app = stepped.app
    charge = app.stepped_action("charge", actor=Car, outbound=True, **options)

    @charge.step
    def ask(step: Step, car: Car) -> None:
        car.note("asked")

    for status in ("succeeded", "failed", "cancelled", "timed_out"):
        charge.after(status)(
            lambda action, car, status=status: car.note(f"after {status}")  # type: ignore[misc]
        )

    checkout = app.stepped_action("checkout", actor=Car)

    @checkout.step
    def pay(step: Step, car: Car) -> None:
        step.do(charge)

    @checkout.step
    def ship(step: Step, car: Car) -> None:
        car.note("shipped")

    return charge, checkout


# -- outbound --


def test_outbound_stays_performing_until_completed(stepped: Stepped, car: Car) -> None:
    charge, checkout = define_outbound(stepped)
    with stepped.capture() as jobs:
        root = checkout.now(car)
        perform_stepped_actions(stepped)
        (child,) = stored_actions(stepped, "charge")
        assert child.status == "performing" and child.outbound
        assert stepped.get_action(root.id).status == "performing"
        assert stepped.lanes.get(child.concurrency_key).current_id == child.id
        completed = charge.complete_now(car)
        assert completed is not None and completed.id == child.id
        assert completed.status == ActionStatus.SUCCEEDED
        assert charge.complete_now(car) is None  # nothing performing any more
        jobs.perform_all()
    assert stepped.get_action(root.id).status == "succeeded"
    assert load_car(stepped, car.id).log == "asked;after succeeded;shipped;"
    assert stepped.lanes.count() == 0


@pytest.mark.parametrize("status", ["failed", "cancelled", "timed_out"])
def test_unsuccessful_outbound_completion_fails_parent(
    stepped: Stepped, car: Car, status: str
) -> None:
    charge, checkout = define_outbound(stepped)
    with stepped.capture():
        root = checkout.now(car)
        perform_stepped_actions(stepped)
        assert charge.complete_now(car, status=status).status == status
        perform_stepped_actions(stepped)
    done = stepped.get_action(root.id)
    assert done.status == "failed"
    assert [s.status for s in done.steps] == ["failed"]
    assert load_car(stepped, car.id).log == f"asked;after {status};"


def test_complete_later_and_stepped_complete(stepped: Stepped, car: Car) -> None:
    charge, checkout = define_outbound(stepped)
    with stepped.capture() as jobs:
        assert charge.complete_later(car) is not None  # decided when its message runs
        root = checkout.now(car)
        perform_stepped_actions(stepped)  # the first message ran before charge started
        assert charge.complete_later(car, status="succeeded") is not None
        assert [(j.kind, j.name, j.args) for j in jobs.enqueued] == [
            ("complete", "charge", ["succeeded"])
        ]
        perform_stepped_actions(stepped)
    assert stepped.get_action(root.id).status == "succeeded"
    (child,) = stored_actions(stepped, "charge")
    assert stepped.complete(child.id, "failed") is None  # already final
    with pytest.raises(ValueError, match="status"):
        stepped.complete(child.id, "superseded")
    with pytest.raises(ValueError):
        charge.complete_now(car, status="bogus")


def test_outbound_completion_moves_the_lane_on(stepped: Stepped, car: Car) -> None:
    charge, _ = define_outbound(stepped)
    with stepped.capture() as jobs:
        first = charge.now(car)
        second = charge.now(car)
        assert second.status == "pending"
        lane = stepped.lanes.get(first.concurrency_key)
        assert lane is not None and (lane.current_id, lane.pending_ids) == (first.id, [second.id])
        stepped.complete(first)
        jobs.perform_all()
        assert stepped.get_action(second.id).status == "performing"
        assert stepped.lanes.get(first.concurrency_key).current_id == second.id
        stepped.complete(second.id, "cancelled")
    assert stepped.lanes.count() == 0


def test_exactly_one_of_racing_completions_wins(stepped: Stepped, car: Car) -> None:
    import threading

    charge, _ = define_outbound(stepped)
    action = charge.now(car)
    results: list[Any] = []
    barrier = threading.Barrier(4)

    def complete() -> None:
        barrier.wait()
        results.append(stepped.complete(action.id, "succeeded"))

    threads = [threading.Thread(target=complete) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r is not None for r in results) == 1
    assert load_car(stepped, car.id).log.count("after succeeded") == 1


# -- job-backed --------------------------------------------------------------------------------


def define_tow(stepped: Stepped, retries_first: int = 0) -> tuple[Any, Any, list[int]]:
    app = stepped.app
    calls: list[int] = []

    @app.task(bind=True, name="tests.tow", shared=False, max_retries=5)
    def tow_task(self: Any, action_id: int) -> None:
        calls.append(action_id)
        if len(calls) <= retries_first:
            raise self.retry(countdown=30)
        action = stepped.get_action(action_id)
        with stepped.session() as session:
            car = session.get_one(Car, action.actor.id)
            car.location = action.arguments[0]
        stepped.complete(action)

    tow = app.stepped_action("tow", actor=Car, job=tow_task)

    @tow.prepend_step
    def honk_first(step: Step, car: Car, where: str) -> None:
        car.note("honk before tow")

    return tow, tow_task, calls


def test_job_backed_action_runs_its_task(stepped: Stepped, car: Car) -> None:
    tow, _tow_task, calls = define_tow(stepped)
    assert tow.outbound
    with stepped.capture() as jobs:
        action = tow.now(car, "garage")
        assert action.status == "performing" and action.job == "tests.tow"
        assert [(j.kind, j.name, j.args) for j in jobs.enqueued] == [
            ("job", "tests.tow", [action.id])
        ]
        perform_stepped_actions(stepped)
    assert calls == [action.id]
    assert stepped.get_action(action.id).status == "succeeded"
    stored = load_car(stepped, car.id)
    assert (stored.location, stored.log) == ("garage", "honk before tow;")


def test_job_retry_keeps_action_performing(stepped: Stepped, car: Car) -> None:
    tow, _, calls = define_tow(stepped, retries_first=2)
    with stepped.capture() as jobs:
        action = tow.now(car, "yard")
        assert jobs.perform() == 1
        assert [j.kind for j in jobs.enqueued] == ["job"]  # retried: enqueued again
        assert stepped.get_action(action.id).status == "performing"
        assert jobs.perform() == 1
        assert stepped.get_action(action.id).status == "performing"
        assert jobs.perform() == 1
        assert jobs.enqueued == []
    assert len(calls) == 3
    assert stepped.get_action(action.id).status == "succeeded"


# -- waits --


def test_wait_blocks_the_step_until_performed(stepped: Stepped, car: Car) -> None:
    stopover = stepped.app.stepped_action("stopover", actor=Car)

    @stopover.step
    def pause(step: Step, car: Car) -> None:
        step.wait(5)
        step.wait(timedelta(minutes=2))

    @stopover.step
    def honk(step: Step, car: Car) -> None:
        car.honk()

    with stepped.capture() as jobs:
        action = stopover.now(car)
        assert [(j.kind, j.args) for j in jobs.enqueued] == [("wait", [5.0]), ("wait", [120.0])]
        assert jobs.messages[1].countdown == 120.0
        jobs.perform()
    done = stepped.get_action(action.id)
    assert done.status == "succeeded"
    assert load_car(stepped, car.id).honks == 1
    with pytest.raises(TypeError), stepped.session() as session:
        from celery_stepped import Step as StepContext

        StepContext(session, done, car, list, str, str).wait(-1)


# -- timeouts --


@pytest.mark.parametrize("timeout", [5, 5.0, timedelta(seconds=5), lambda car: 5])
def test_timeout_fires_only_after_the_deadline(stepped: Stepped, car: Car, timeout: Any) -> None:
    _charge, checkout = define_outbound(stepped, timeout=timeout)
    real_clock = stepped.clock
    with stepped.capture() as jobs:
        root = checkout.now(car)
        jobs.perform(only="action")
        (child,) = stored_actions(stepped, "charge")
        assert child.timeout_seconds == 5.0
        assert [(j.kind, j.name) for j in jobs.enqueued] == [("timeout", "charge")]
        assert jobs.messages[0].countdown == 5.0
        perform_stepped_actions(stepped)  # before the deadline: nothing happens
        assert stepped.get_action(child.id).status == "performing"
        assert [j.kind for j in jobs.enqueued] == ["timeout"]  # it waits for its time
        stepped.clock = lambda: real_clock() + timedelta(seconds=6)
        perform_stepped_actions(stepped)
    assert stepped.get_action(child.id).status == "timed_out"
    assert stepped.get_action(root.id).status == "failed"
    assert load_car(stepped, car.id).log == "asked;after timed_out;"


def test_completed_action_ignores_its_timeout(stepped: Stepped, car: Car) -> None:
    charge, _ = define_outbound(stepped, timeout=1)
    with stepped.capture() as jobs:
        action = charge.now(car)
        charge.complete_now(car)
        later = stepped.clock() + timedelta(hours=1)
        stepped.clock = lambda: later
        assert jobs.perform(only="timeout") == 1
    assert stepped.get_action(action.id).status == "succeeded"


def test_timeouts_propagate_up_a_tree(stepped: Stepped, car: Car) -> None:
    _charge, checkout = define_outbound(stepped, timeout=timedelta(seconds=1))
    top = stepped.app.stepped_action("top", actor=Car)

    @top.step
    def go(step: Step, car: Car) -> None:
        step.do(checkout)

    real_clock = stepped.clock
    with stepped.capture():
        root = top.now(car)
        perform_stepped_actions(stepped)
        stepped.clock = lambda: real_clock() + timedelta(seconds=2)
        perform_stepped_actions(stepped)
    assert [a.status for a in stored_actions(stepped, "checkout")] == ["failed"]
    assert stepped.get_action(root.id).status == "failed"


# -- exceptions and redelivery --


def test_unhandled_step_error_propagates_and_redelivery_does_not_double(
    stepped: Stepped, car: Car
) -> None:
    app = stepped.app
    app.stepped_action("honk", actor=Car)
    attempts: list[int] = []
    fragile = app.stepped_action("fragile", actor=Car)

    @fragile.step
    def go(step: Step, car: Car) -> None:
        attempts.append(1)
        car.note("body")
        step.do("honk")
        step.do("honk")
        if len(attempts) == 1:
            raise ConnectionError("flaky network")

    with handle_stepped_action_exceptions(stepped, only=(KeyError,)), stepped.capture() as jobs:
        fragile.later(car)
        (start,) = jobs.messages
        with pytest.raises(ConnectionError):
            jobs.perform()
        (action,) = stored_actions(stepped, "fragile")
        assert action.status == "performing"
        assert load_car(stepped, car.id).log == ""  # the whole step rolled back
        for _ in range(3):  # Celery delivers the message again (and again)
            stepped.core.run_message(start)
        assert len(attempts) == 2  # the committed body never runs twice
        header = [j for j in jobs.messages if j.kind == "action"]
        assert len(header) == 2
        for job in header + header:  # each child message delivered twice
            stepped.core.run_message(job)
        jobs.messages.clear()
    assert load_car(stepped, car.id).log == "body;"
    assert load_car(stepped, car.id).honks == 2
    assert len(stored_actions(stepped, "honk")) == 2
    done = stepped.get_action(action.id)
    assert done.status == "succeeded"
    assert len(stored_actions(stepped, "fragile")) == 1


def test_duplicate_wait_and_advance_messages_count_once(stepped: Stepped, car: Car) -> None:
    completed_steps: list[Any] = []

    def on_step(sender: Any, **kw: Any) -> None:
        completed_steps.append(kw["step_id"])

    pause = stepped.app.stepped_action("pause", actor=Car)

    @pause.step
    def two_waits(step: Step, car: Car) -> None:
        step.wait(1)
        step.wait(1)

    signals.step_completed.connect(on_step)
    try:
        with stepped.capture() as jobs:
            action = pause.now(car)
            first, second = list(jobs.messages)
            jobs.messages.clear()
            stepped.core.run_message(first)
            stepped.core.run_message(first)  # duplicate: must not count as the second wait
            assert stepped.get_action(action.id).status == "performing"
            stepped.core.run_message(second)
            step_id = stepped.get_action(action.id).steps[0].id
            for _ in range(2):
                stepped.core.run_message(advance_message(step_id))
    finally:
        signals.step_completed.disconnect(on_step)
    assert completed_steps == [step_id]
    assert stepped.get_action(action.id).status == "succeeded"
    with stepped.session() as session:
        assert session.scalar(select(func.count()).select_from(ParentLink)) == 2


def test_handled_key_block_errors_fail_without_rows(stepped: Stepped) -> None:
    car = make_car(stepped)
    keyed = stepped.app.stepped_action("keyed", actor=Car)

    @keyed.concurrency_key
    def broken_key(car: Car) -> str:
        raise LookupError("no key")

    action = keyed.now(car)
    assert action.status == "failed" and action.id is None
    assert stored_actions(stepped, "keyed") == []
    with handle_stepped_action_exceptions(stepped, only=(KeyError,)), pytest.raises(LookupError):
        keyed.now(car)


def test_a_crash_inside_after_callbacks_rolls_the_whole_completion_back(
    stepped: Stepped, car: Car
) -> None:
    """Final status, callbacks, achievement and the report to the parent commit together:
    a process that dies in the second callback leaves no trace of the first one, and the
    redelivery completes the action with each callback run once."""
    from celery_stepped.models import Achievement

    app = stepped.app
    ran: list[str] = []
    crash = [True]
    sign = app.stepped_action("sign", actor=Car, outbound=True, checksum=lambda car: "v1")

    @sign.step
    def ask(step: Step, car: Car) -> None:
        pass

    @sign.succeeded
    def first(action: Action, car: Car) -> None:
        ran.append("first")
        car.note("first")

    @sign.succeeded
    def second(action: Action, car: Car) -> None:
        if crash and crash.pop():
            raise KeyboardInterrupt  # the process dies here (not an Exception: not handled)
        ran.append("second")
        car.note("second")

    deal = app.stepped_action("deal", actor=Car)

    @deal.step
    def go(step: Step, car: Car) -> None:
        step.do(sign)

    with stepped.capture():
        root = deal.now(car)
        perform_stepped_actions(stepped)
        (child,) = stored_actions(stepped, "sign")
        with pytest.raises(KeyboardInterrupt):
            stepped.complete(child.id)
        seen = stepped.get_action(child.id)
        assert (seen.status, seen.after_callbacks_succeeded_count) == ("performing", 0)
        assert not load_car(stepped, car.id).log  # first's note was rolled back too
        assert stepped.get_action(root.id).steps[0].pending_actions_count == 1
        with stepped.session() as session:
            assert session.scalar(select(func.count()).select_from(Achievement)) == 0
        assert stepped.complete(child.id) is not None  # delivered again
        perform_stepped_actions(stepped)
    assert ran == ["first", "first", "second"]  # the first run's effects were rolled back
    done = stepped.get_action(child.id)
    assert (done.after_callbacks_succeeded_count, done.after_callbacks_failed_count) == (2, 0)
    assert load_car(stepped, car.id).log == "first;second;"
    assert stepped.get_action(root.id).status == "succeeded"
    with stepped.session() as session:
        assert session.scalar(select(Achievement.checksum_key)) == f"Car/{car.id}/sign"


def test_an_operational_error_from_the_users_own_query_is_the_users(
    stepped: Stepped, car: Car
) -> None:
    """Whatever its class, an exception raised by a step body is the body's: handled per
    ``handle_exceptions`` (the step fails with the error stored), never retried as
    Stepped's own store error."""
    from sqlalchemy.exc import OperationalError

    app = stepped.app

    @app.stepped_action
    def report(step: Step, car: Car) -> None:
        raise OperationalError("SELECT * FROM warehouse", {}, Exception("warehouse db is down"))

    with stepped.capture():
        action = report.now(car)
    done = stepped.get_action(action.id)
    assert done.status == "failed"
    (failed_step,) = done.steps
    assert failed_step.error is not None
    assert failed_step.error["type"] == "OperationalError"
    assert "warehouse db is down" in failed_step.error["message"]
    with (
        handle_stepped_action_exceptions(stepped, only=(KeyError,)),
        pytest.raises(OperationalError),
    ):
        report.now(car)  # not handled: it propagates to Celery, as any other class
