"""An action's ``queue=`` routes every message its own code produces (issue 13, item 5).

The messages are held by a capture, so the test reads the queue each one would be
published to. The cross-worker behaviour (a step body running only on the worker of
its action's queue) is ``tests/integration/test_routing.py``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from celery_stepped import Step, Stepped
from celery_stepped.messages import TaskName
from tests.models import Car


def define(stepped: Stepped) -> Any:
    app: Celery = stepped.app

    @app.task(name="tests.unit.routing.mail", shared=False)
    def mail(user: int) -> None: ...

    routed = app.stepped_action("routed", actor=Car, queue="body", timeout=60, outbound=True)

    @routed.step
    def out(step: Step, car: Car) -> None:
        step.do("helper")
        step.wait(5)
        step.task(mail.s(1), timeout=10)

    helper = app.stepped_action("helper", actor=Car)

    @helper.step
    def work(step: Step, car: Car) -> None: ...

    return routed


def test_the_start_waits_timeout_and_task_reports_go_to_the_actions_queue(
    stepped: Stepped, car: Car
) -> None:
    routed = define(stepped)
    with stepped.capture() as jobs:
        routed.later(car)
        assert [(m.task, m.queue) for m in jobs.messages] == [(TaskName.START, "body")]
        jobs.perform()
        queues = {(m.kind.value, m.name): m.queue for m in jobs.messages}
        assert queues == {
            ("timeout", "routed"): "body",
            ("action", "helper"): None,  # the child's own queue: the Stepped queue
            ("wait", "wait"): "body",
            ("task", "tests.unit.routing.mail"): "body",  # where its report goes
            ("member", "member"): "body",  # its timeout
        }
        jobs.messages.clear()
        routed.complete_later(car)
        assert [(m.task, m.queue) for m in jobs.messages] == [(TaskName.COMPLETE, "body")]
        jobs.messages.clear()


def test_queue_in_later_routes_only_the_start(stepped: Stepped, car: Car) -> None:
    routed = define(stepped)
    with stepped.capture() as jobs:
        routed.later(car, queue="urgent")
        assert [m.queue for m in jobs.messages] == ["urgent"]
        jobs.perform()
        assert {m.queue for m in jobs.messages if m.name != "helper"} == {"body"}
        jobs.messages.clear()
