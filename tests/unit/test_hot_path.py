"""The per-action hot path (issue 12): what the shorter path still guarantees.

A child without ``before`` starts without a start record; its ancestry comes with its
parent link; the last step of an action completes it in the step's own transaction.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select, update

from celery_stepped import Step, Stepped
from celery_stepped.models import ParentLink, StartRecord
from celery_stepped.models import Step as StepRow
from celery_stepped.staging import as_redelivery
from tests.conftest import load_car, stored_actions
from tests.models import Car


class Crash(Exception):
    """Stands for the process dying at that point."""


def define_tree(stepped: Stepped, key: Any = None) -> Any:
    """``parent`` (one step starting ``leaf``), ``leaf`` (one step noting "leaf;")."""
    app = stepped.app
    key = key or (lambda car: ["leaf", car.id])

    @app.stepped_action(actor=Car, concurrency_key=key)
    def leaf(car: Car) -> None:
        car.note("leaf")

    @app.stepped_action(actor=Car)
    def parent(step: Step, car: Car) -> None:
        step.do(leaf)

    return parent


def start_records(stepped: Stepped) -> int:
    with stepped.session() as session:
        return int(session.scalar(select(func.count()).select_from(StartRecord)) or 0)


def test_a_child_without_before_delivered_twice_runs_once_without_a_start_record(
    stepped: Stepped, car: Car
) -> None:
    parent = define_tree(stepped)
    with stepped.capture() as jobs:
        root = parent.now(car)
        (start,) = jobs.take("action")
        for _ in range(3):
            stepped.core.run_message(start)
    assert [a.status for a in stored_actions(stepped, "leaf")] == ["succeeded"]
    assert stepped.get_action(root.id).status == "succeeded"
    assert load_car(stepped, car.id).log == "leaf;"
    assert start_records(stepped) == 0


def test_a_child_whose_key_fails_is_counted_once_when_delivered_again(
    stepped: Stepped, car: Car
) -> None:
    failures: list[int] = []

    def broken_key(car: Car) -> list[Any]:
        failures.append(car.id)
        raise ValueError("no key")

    parent = define_tree(stepped, broken_key)
    with stepped.capture() as jobs:
        root = parent.now(car)
        # The parent's step ran the key to write the child's row; it raised, so the
        # child's own start creates it and runs the key again.
        assert failures == [car.id] and stored_actions(stepped, "leaf") == []
        (start,) = jobs.take("action")
        assert "action" not in start.args[0]  # no row written for it
        stepped.core.run_message(start)
        again = as_redelivery(start, stepped.clock(), stepped.clock())
        stepped.core.run_message(again)  # the link is done: nothing runs again
        assert failures == [car.id, car.id]
        stepped.core.run_message(start)  # a duplicate not marked: keys again, counted once
    assert stored_actions(stepped, "leaf") == []
    assert stepped.get_action(root.id).status == "failed"
    assert failures == [car.id, car.id, car.id]
    with stepped.session() as session:
        (step,) = session.scalars(select(StepRow).where(StepRow.action_id == root.id)).all()
        assert (step.pending_actions_count, step.unsuccessful_actions_count) == (0, 1)


@pytest.mark.parametrize("in_link", [True, False], ids=["from-link", "link-of-earlier-version"])
def test_a_childs_ancestry_names_its_parent(stepped: Stepped, car: Car, in_link: bool) -> None:
    parent = define_tree(stepped)
    with stepped.capture() as jobs:
        root = parent.now(car)
        (start,) = jobs.take("action")
        if not in_link:  # a link written before the parent recorded the ancestry in it
            with stepped.session() as session:
                link = session.scalars(select(ParentLink)).one()
                assert (link.call or {})["ancestry"] == f",{root.id},"
                call = {k: v for k, v in (link.call or {}).items() if k != "ancestry"}
                session.execute(update(ParentLink).values(call=call))
        stepped.core.run_message(start)
    (leaf,) = stored_actions(stepped, "leaf")
    assert leaf.ancestry == f",{root.id},"


def test_a_crash_after_the_last_step_committed_is_finished_by_the_redelivery(
    stepped: Stepped, car: Car, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last step, the completion and the report to the parent commit together;
    a crash before the lane release is finished by the start message's redelivery."""
    parent = define_tree(stepped)

    def crash(*_: Any) -> None:
        raise Crash

    with stepped.capture() as jobs:
        root = parent.now(car)
        (start,) = jobs.take("action")
        with monkeypatch.context() as patch:
            patch.setattr(stepped.core.completer, "release", crash)
            with pytest.raises(Crash):
                stepped.core.run_message(start)
        (leaf,) = stored_actions(stepped, "leaf")
        assert leaf.status == "succeeded"
        assert stepped.lanes.get(leaf.concurrency_key) is not None  # not released yet
        with stepped.core.delivering(recovering=True):  # as a worker runs a redelivery
            stepped.core.start(*start.args)
    assert stepped.lanes.get(leaf.concurrency_key) is None
    assert stepped.get_action(root.id).status == "succeeded"
    with stepped.session() as session:
        steps = session.scalars(select(StepRow).where(StepRow.action_id == leaf.id)).all()
    assert [s.status for s in steps] == ["succeeded"]
    assert load_car(stepped, car.id).log == "leaf;"


def test_after_callbacks_still_run_in_the_completion(stepped: Stepped, car: Car) -> None:
    """An action with after callbacks completes in a transaction of its own (a callback
    that raises must not roll back its last step's writes)."""
    app = stepped.app
    noted = app.stepped_action("noted", actor=Car)

    @noted.step
    def body(step: Step, car: Car) -> None:
        car.note("body")

    @noted.after("succeeded")
    def after(action: Any, car: Car) -> None:
        car.note("after")

    action = noted.now(car)
    assert stepped.get_action(action.id).status == "succeeded"
    assert load_car(stepped, car.id).log == "body;after;"
