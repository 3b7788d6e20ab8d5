"""Plain Celery tasks as members of a step's join (``step.task``), in this process.

Captures run a task member through Celery's ``apply`` and count its outcome; the
real worker (redelivery, revocation, link/link_error) is in
``tests/integration/test_task_members.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_stepped import Step, Stepped
from celery_stepped.messages import MessageKind
from celery_stepped.models import ParentLink
from celery_stepped.rendering import tree_lines
from celery_stepped.views import action_tree
from tests.conftest import load_car
from tests.models import Car


def define(stepped: Stepped) -> Any:
    app: Celery = stepped.app

    @app.task(name="tests.unit.members.mail", shared=False)
    def mail(user: int) -> str:
        if user < 0:
            raise ValueError("no such user")
        return f"mailed {user}"

    notify = app.stepped_action("notify", actor=Car)

    @notify.step
    def send(step: Step, car: Car, users: list[int]) -> None:
        for user in users:
            step.task(mail.s(user), timeout=30)

    @notify.step
    def after(step: Step, car: Car, users: list[int]) -> None:
        car.note("after")

    return notify


def links(stepped: Stepped) -> list[tuple[str, str, str | None]]:
    with stepped.session() as s:
        rows = s.query(ParentLink).order_by(ParentLink.id).all()
        return [(r.kind, r.state, r.outcome) for r in rows]


def test_task_members_count_once_and_the_step_moves_on(stepped: Stepped, car: Car) -> None:
    notify = define(stepped)
    with stepped.capture() as jobs:
        action = notify.now(car, [1, 2])
        kinds = [job.kind for job in jobs.enqueued]
        assert kinds == ["task", "member", "task", "member"]
        assert jobs.enqueued[0].name == "tests.unit.members.mail"
        jobs.perform_all()
    done = stepped.get_action(action.id)
    assert done.status == "succeeded"
    assert load_car(stepped, car.id).log == "after;"
    # The timeouts ran after the tasks had reported: they changed nothing.
    assert links(stepped) == [("task", "done", "succeeded"), ("task", "done", "succeeded")]


def test_a_failing_task_member_fails_the_step(stepped: Stepped, car: Car) -> None:
    notify = define(stepped)
    with stepped.capture() as jobs:
        action = notify.now(car, [1, -1, 2])
        jobs.perform_all(only=["task"])
    done = stepped.get_action(action.id)
    assert done.status == "failed"
    assert done.steps[0].unsuccessful_actions_count == 1
    assert links(stepped) == [
        ("task", "done", "succeeded"),
        ("task", "done", "failed"),
        ("task", "done", "succeeded"),
    ]
    lines = "\n".join(tree_lines(action_tree(stepped, action.id)))
    assert "task tests.unit.members.mail(-1): failed" in lines
    assert "task tests.unit.members.mail(1): succeeded" in lines


def test_a_timeout_that_elapses_first_counts_as_timed_out(stepped: Stepped, car: Car) -> None:
    notify = define(stepped)
    with stepped.capture() as jobs:
        action = notify.now(car, [1])
        jobs.perform(only="member")  # the timeout reports before the task ran
        jobs.perform_all()
    assert stepped.get_action(action.id).status == "failed"
    assert links(stepped) == [("task", "done", "timed_out")]
    member = action_tree(stepped, action.id)["steps"][0]["members"][0]
    assert member["kind"] == "task"
    assert (member["name"], member["args"], member["outcome"]) == (
        "tests.unit.members.mail",
        [1],
        "timed_out",
    )


@pytest.mark.parametrize(
    ("argument", "timeout"),
    [("not a signature", None), (object(), None), ("sig", -1), ("sig", True)],
)
def test_step_task_refuses_bad_input_in_the_body(
    stepped: Stepped, car: Car, argument: Any, timeout: Any
) -> None:
    app: Celery = stepped.app

    @app.task(name="tests.unit.members.plain", shared=False)
    def plain(value: Any) -> None: ...

    bad = app.stepped_action("bad", actor=Car)

    @bad.step
    def body(step: Step, car: Car) -> None:
        step.task(plain.s(1) if argument == "sig" else argument, timeout=timeout)

    with stepped.capture():
        action = bad.now(car)
    failed = stepped.get_action(action.id)
    assert failed.status == "failed"
    assert failed.steps[0].error["type"] == "TypeError"


def test_arguments_that_are_not_json_fail_the_step(stepped: Stepped, car: Car) -> None:
    app: Celery = stepped.app

    @app.task(name="tests.unit.members.plain2", shared=False)
    def plain(value: Any) -> None: ...

    bad = app.stepped_action("bad_json", actor=Car)

    @bad.step
    def body(step: Step, car: Car) -> None:
        step.task(plain.s(object()))

    with stepped.capture():
        action = bad.now(car)
    assert stepped.get_action(action.id).steps[0].error["type"] == "TypeError"
    assert MessageKind.TASK.value == "task"


def test_repair_sends_a_waiting_task_member_again(stepped: Stepped, car: Car) -> None:
    notify = define(stepped)
    with stepped.capture() as jobs:
        action = notify.now(car, [5])
        jobs.messages.clear()  # the broker lost them
        report = stepped.repair(apply=True)
        resent = [(r.task, r.target) for r in report.resends]
        with stepped.session() as s:
            link_id = s.query(ParentLink.id).scalar()
        assert ("tests.unit.members.mail", link_id) in resent
        assert [job.kind for job in jobs.enqueued] == ["task", "member"]
        jobs.perform_all()
    assert stepped.get_action(action.id).status == "succeeded"
