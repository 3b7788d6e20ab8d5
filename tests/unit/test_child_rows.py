"""Children created with their parent's step (issue 12, ``celery_stepped.child_rows``).

A child without ``before`` or a checksum has its pending row written by the step that
asks for it, in the body's transaction, with its link claimed; its start reads that
row and enters its lane. These tests pin what that must keep: the keys see the
arguments and actor as the body left them, a step rolled back leaves no child, a start
delivered twice (or after healing moved the child on) runs it once, and the child's
own start writes one commit and no action row.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import event, select

from celery_stepped import Step, Stepped
from celery_stepped.models import ParentLink
from celery_stepped.outbox import JobQueue
from celery_stepped.staging import as_redelivery
from celery_stepped.testing import handle_stepped_action_exceptions, perform_stepped_actions
from tests.conftest import load_car, stored_actions
from tests.models import Car


def define_parent(stepped: Stepped, move_after_do: bool = False) -> Any:
    """``parent``: one step starting ``leaf(3)`` whose lane is keyed by the car's
    location (``move_after_do``: the body moves the car after asking for the child)."""
    app = stepped.app

    @app.stepped_action(actor=Car, concurrency_key=lambda c, n: ["leaf", c.location, n])
    def leaf(c: Car, n: int) -> None:
        c.note(f"leaf{n}")

    @app.stepped_action(actor=Car)
    def parent(step: Step, c: Car) -> None:
        step.do(leaf, 3)
        if move_after_do:
            c.location = "garage"

    return parent


def links_of(stepped: Stepped) -> list[tuple[int | None, str]]:
    with stepped.session() as session:
        rows = session.execute(select(ParentLink.action_id, ParentLink.state)).all()
        return [(row.action_id, row.state) for row in rows]


def test_a_plain_childs_row_is_written_with_its_parents_step(stepped: Stepped, car: Car) -> None:
    parent = define_parent(stepped)
    with stepped.capture() as jobs:
        root = parent.now(car)
        (child,) = stored_actions(stepped, "leaf")
        assert (child.status, child.root, child.arguments) == ("pending", False, [3])
        assert child.ancestry == f",{root.id}," and child.concurrency_key == "leaf//3"
        assert links_of(stepped) == [(child.id, "waiting")]  # claimed by it already
        (start,) = jobs.take("action")
        assert start.args[0]["action"] == child.id  # its start names the row
        stepped.core.run_message(start)
    assert [a.status for a in stored_actions(stepped, "leaf")] == ["succeeded"]
    assert stepped.get_action(root.id).status == "succeeded"
    assert load_car(stepped, car.id).log == "leaf3;"


def test_its_keys_see_the_actor_as_the_body_left_it(stepped: Stepped, car: Car) -> None:
    parent = define_parent(stepped, move_after_do=True)
    with stepped.capture():
        parent.now(car)
        (child,) = stored_actions(stepped, "leaf")
        # Computed when the body returned, as its own start would see it after the commit.
        assert child.concurrency_key == "leaf/garage/3"
        perform_stepped_actions(stepped)
    assert load_car(stepped, car.id).location == "garage"


def test_a_step_that_raises_leaves_no_child(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    stepped.handle_exceptions = (ValueError,)

    @app.stepped_action(actor=Car)
    def leaf(c: Car) -> None:
        c.note("leaf")

    @app.stepped_action(actor=Car)
    def parent(step: Step, c: Car) -> None:
        step.do(leaf)
        raise ValueError("after asking for the child")

    with stepped.capture() as jobs, handle_stepped_action_exceptions(stepped):
        root = parent.now(car)
        assert jobs.enqueued == []
    assert stepped.get_action(root.id).status == "failed"
    assert stored_actions(stepped, "leaf") == [] and links_of(stepped) == []


def test_a_start_delivered_twice_runs_its_child_once(stepped: Stepped, car: Car) -> None:
    parent = define_parent(stepped)
    with stepped.capture() as jobs:
        root = parent.now(car)
        (start,) = jobs.take("action")
        stepped.core.run_message(start)
        stepped.core.run_message(start)  # a duplicate, as a first delivery
        stepped.core.run_message(as_redelivery(start, stepped.clock(), stepped.clock()))
        perform_stepped_actions(stepped)
    assert [a.status for a in stored_actions(stepped, "leaf")] == ["succeeded"]
    assert stepped.get_action(root.id).status == "succeeded"
    assert load_car(stepped, car.id).log == "leaf3;"


def test_a_start_that_finds_its_child_moved_on_carries_it_on(stepped: Stepped, car: Car) -> None:
    parent = define_parent(stepped)
    with stepped.capture() as jobs:
        root = parent.now(car)
        (start,) = jobs.take("action")
        (child,) = stored_actions(stepped, "leaf")
        stepped.core.drive(stepped.core.carry_on(child.id))  # as healing would, first
        assert [a.status for a in stored_actions(stepped, "leaf")] == ["succeeded"]
        stepped.core.run_message(start)  # then its start arrives: nothing runs again
        perform_stepped_actions(stepped)
    assert stepped.get_action(root.id).status == "succeeded"
    assert load_car(stepped, car.id).log == "leaf3;"


def test_a_childs_start_writes_no_action_row_and_commits_once(stepped: Stepped, car: Car) -> None:
    parent = define_parent(stepped)
    statements: list[str] = []

    def record(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        statements.append(" ".join(statement.split()))

    def record_commit(*_: Any) -> None:
        statements.append("COMMIT")

    with stepped.capture() as jobs:
        parent.now(car)
        (start,) = jobs.take("action")
        event.listen(stepped.engine, "before_cursor_execute", record)
        event.listen(stepped.engine, "commit", record_commit)
        try:
            stepped.core.run_message(start)  # the child, up to its report to the parent
        finally:
            event.remove(stepped.engine, "before_cursor_execute", record)
            event.remove(stepped.engine, "commit", record_commit)
    child_part = statements[: statements.index("COMMIT") + 1]
    assert not any(s.startswith("INSERT INTO stepped_actions") for s in statements)
    assert not any(s.startswith("UPDATE stepped_parent_links SET action_id") for s in statements)
    # Its row read, its actor, then one transaction: its step, its end, its report.
    assert child_part[0].startswith("SELECT stepped_actions.id")
    assert child_part.count("COMMIT") == 1
    assert any(s.startswith("INSERT INTO stepped_steps") for s in child_part)


@pytest.mark.parametrize("hook", ["before", "checksum"])
def test_a_child_with_before_or_a_checksum_is_created_by_its_own_start(
    stepped: Stepped, stepped_jobs: JobQueue, car: Car, hook: str
) -> None:
    app = stepped.app
    leaf = app.stepped_action("leaf", actor=Car)
    if hook == "before":
        leaf.before(lambda action, c: None)
    else:
        leaf.checksum(lambda c: "same")

    @leaf.step
    def body(step: Step, c: Car) -> None:
        c.note("leaf")

    @app.stepped_action(actor=Car)
    def parent(step: Step, c: Car) -> None:
        step.do(leaf)

    root = parent.now(car)
    assert stored_actions(stepped, "leaf") == [] and links_of(stepped) == [(None, "waiting")]
    (start,) = stepped_jobs.take("action")
    assert "action" not in start.args[0]
    stepped.core.run_message(start)
    assert [a.status for a in stored_actions(stepped, "leaf")] == ["succeeded"]
    assert stepped.get_action(root.id).status == "succeeded"


def test_an_action_built_from_a_row_works_before_any_orm_query() -> None:
    # A worker process whose first read is the Core read of a child's row builds the
    # action before any ORM query configured the mappers.
    code = (
        "from celery_stepped.models import action_of_row\n"
        "a = action_of_row({'id': 1, 'name': 'x', 'status': 'pending'})\n"
        "a.status = 'performing'\n"
        "print(a.status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "performing"), done.stderr
