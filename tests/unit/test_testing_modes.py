"""Eager mode, capture mode and the testing helpers."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from sqlalchemy import func, select

from celery_stepped import Step, Stepped
from celery_stepped.models import Action
from celery_stepped.testing import (
    EnqueuedJob,
    assert_no_stepped_actions,
    assert_stepped_action_job,
    handle_stepped_action_exceptions,
    perform_stepped_actions,
)
from tests.conftest import load_car, make_car
from tests.models import Car


def status_counts(stepped: Stepped) -> dict[str, int]:
    with stepped.session() as session:
        rows = session.execute(select(Action.status, func.count()).group_by(Action.status)).all()
    return {status: count for status, count in rows}


def define_tree(stepped: Stepped, width: int) -> Any:
    app = stepped.app
    leaf = app.stepped_action("leaf", actor=Car, concurrency_key=lambda car, n: ["leaf", n])

    @leaf.step
    def work(step: Step, car: Car, n: int) -> None:
        pass

    branch = app.stepped_action("branch", actor=Car, concurrency_key=lambda car, n: ["b", n])

    @branch.step
    def spread(step: Step, car: Car, n: int) -> None:
        for i in range(width):
            step.do(leaf, n * width + i)

    root = app.stepped_action("root", actor=Car)

    @root.step
    def start(step: Step, car: Car) -> None:
        for n in range(width):
            step.do(branch, n)

    @root.step
    def finish(step: Step, car: Car) -> None:
        car.note("done")

    return root


def test_eager_runs_a_three_level_tree_of_1000_leaves(eager: Stepped, car: Car) -> None:
    root = define_tree(eager, width=32)  # 32 branches x 32 leaves = 1,024 leaves
    eager.app.conf.task_always_eager = True
    root.later(car)
    counts = status_counts(eager)
    assert counts == {"succeeded": 1 + 32 + 1024}
    assert load_car(eager, car.id).log == "done;"
    assert eager.lanes.count() == 0


def test_eager_runs_a_500_deep_chain_without_recursion(eager: Stepped, car: Car) -> None:
    chain = eager.app.stepped_action("chain", actor=Car, concurrency_key=lambda car, n: ["c", n])

    @chain.step
    def down(step: Step, car: Car, n: int) -> None:
        if n > 0:
            step.do(chain, n - 1)
        else:
            car.note("bottom")

    limit = sys.getrecursionlimit()
    # Even one frame per level would exceed this limit 100 levels before the bottom.
    sys.setrecursionlimit(400)
    try:
        chain.later(car, 500)
    finally:
        sys.setrecursionlimit(limit)
    assert status_counts(eager) == {"succeeded": 501}
    assert load_car(eager, car.id).log == "bottom;"
    with eager.session() as session:
        # (PostgreSQL has no = on json: take the newest action, the chain's bottom)
        deepest = session.scalar(select(Action).order_by(Action.id.desc()).limit(1))
        assert deepest is not None and deepest.arguments == [0]
        assert deepest.ancestry.count(",") == 501  # 500 ancestors, comma-framed


def test_eager_waits_do_not_sleep_and_timeouts_do_not_fire(eager: Stepped, car: Car) -> None:
    slow = eager.app.stepped_action("slow", actor=Car, timeout=0.001)

    @slow.step
    def nap(step: Step, car: Car) -> None:
        step.wait(3600)

    @slow.step
    def after(step: Step, car: Car) -> None:
        car.note("woke")

    slow.later(car)
    assert status_counts(eager) == {"succeeded": 1}
    assert load_car(eager, car.id).log == "woke;"


def test_capture_perform_only_kinds_and_batches(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    app.stepped_action("honk", actor=Car)
    outer = app.stepped_action("outer", actor=Car)

    @outer.step
    def go(step: Step, car: Car) -> None:
        step.do("honk")
        step.wait(10)

    with stepped.capture() as jobs:
        outer.later(car)
        assert jobs.enqueued == [EnqueuedJob("action", "outer", [])]
        assert jobs.perform(only="wait") == 0
        assert jobs.perform() == 1
        assert [(j.kind, j.name) for j in jobs.enqueued] == [("action", "honk"), ("wait", "wait")]
        assert jobs.perform(only=["wait"]) == 1
        assert [j.kind for j in jobs.enqueued] == ["action"]
        assert jobs.perform_all() == 1
        assert jobs.enqueued == []
    assert status_counts(stepped) == {"succeeded": 2}
    with pytest.raises(ValueError, match="kind"), stepped.capture() as jobs:
        jobs.perform(only="nonsense")


def test_nested_captures_hand_leftovers_outward(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    app.stepped_action("honk", actor=Car)
    honk = stepped.registry.find(Car, "honk")
    with stepped.capture() as outer:
        with stepped.capture() as inner:
            honk.later(car)
            assert len(inner.enqueued) == 1 and outer.enqueued == []
        assert [j.name for j in outer.enqueued] == ["honk"]
        assert outer.perform_all() == 1
    assert load_car(stepped, car.id).honks == 1


def test_perform_stepped_actions_needs_a_capture(stepped: Stepped) -> None:
    with pytest.raises(RuntimeError, match="capture"):
        perform_stepped_actions(stepped)


def test_perform_stepped_actions_completes_outbound(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    charge = app.stepped_action("charge", actor=Car, outbound=True)

    @charge.step
    def ask(step: Step, car: Car, cents: int) -> None:
        car.note(f"asked {cents}")

    checkout = app.stepped_action("checkout", actor=Car)

    @checkout.step
    def pay(step: Step, car: Car) -> None:
        step.do(charge, 1500)

    seen: list[str] = []

    def complete(action: Action) -> str | None:
        seen.append(action.name)
        return "succeeded"

    with stepped.capture():
        root = checkout.now(car)
        perform_stepped_actions(stepped)  # without a completer the outbound child waits
        assert stepped.get_action(root.id).status == "performing"
        perform_stepped_actions(stepped, complete_outbound=complete)
    assert seen == ["charge"]
    assert stepped.get_action(root.id).status == "succeeded"
    assert stepped.lanes.count() == 0


def test_assert_helpers(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    app.stepped_action("honk", actor=Car)
    honk = stepped.registry.find(Car, "honk")
    other = make_car(stepped)
    with stepped.capture() as jobs:
        with assert_stepped_action_job(jobs, "honk", actor=car):
            honk.later(car)
        with (
            pytest.raises(AssertionError, match="honk"),
            assert_stepped_action_job(jobs, "honk", actor=car),
        ):
            honk.later(other)
        with pytest.raises(AssertionError, match="drive"), assert_stepped_action_job(jobs, "drive"):
            pass
        with assert_no_stepped_actions(jobs):
            pass
        with (
            pytest.raises(AssertionError, match="no stepped jobs"),
            assert_no_stepped_actions(jobs),
        ):
            honk.later(car)


def test_handle_exceptions_context_restores(stepped: Stepped) -> None:
    before = stepped.handle_exceptions
    with handle_stepped_action_exceptions(stepped, only=[KeyError]):
        assert stepped.handle_exceptions == (KeyError,)
    assert stepped.handle_exceptions == before


def test_pytest_plugin_fixture(stepped_jobs: Any, stepped: Stepped, car: Car) -> None:
    stepped.app.stepped_action("honk", actor=Car)
    stepped.registry.find(Car, "honk").later(car)
    assert [j.name for j in stepped_jobs.enqueued] == ["honk"]
    perform_stepped_actions(stepped)
    assert load_car(stepped, car.id).honks == 1
