"""Stepped actions in Celery's canvas, on a real worker with a Redis result backend.

Issue 13, items 2 and 3: the ``AsyncResult`` of a root tracks the action (``get()``
returns its final status or raises ``ActionFailed``); a stepped signature in a
``chain``, a ``group`` or a chord header behaves like a task that finishes when its
action is final. Step bodies and plain tasks append to the car's log in SQL, so the
log shows the order in which things ran.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import chain, chord, group, states

from celery_stepped import ActionFailed
from tests.integration.conftest import WAIT, Cluster, make_cluster
from tests.models import Car


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_base: str
) -> Cluster:
    """One worker; the app and the test process share a Redis result backend."""
    return make_cluster(request, tmp_path_factory, redis_base, backend=True)


def action(it: Cluster, name: str) -> Any:
    return it.stepped.registry.find(Car, name)


def task(it: Cluster, name: str) -> Any:
    return it.app.tasks[f"tests.canvas.{name}"]


def test_later_returns_a_result_that_tracks_the_root(it: Cluster) -> None:
    car = it.make_car()
    result = action(it, "canvas_drive").later(car, "one")
    assert result.get(timeout=WAIT) == "succeeded"
    assert result.state == states.SUCCESS
    assert result.action_id is not None
    assert it.stepped.get_action(result.action_id).request_id == result.id
    assert it.log_tokens(car.id) == ["drive-one"]

    failing = action(it, "canvas_fail").s(car).later()
    with pytest.raises(ActionFailed) as raised:
        failing.get(timeout=WAIT)
    assert raised.value.status == "failed"
    assert raised.value.action_id == failing.action_id
    assert failing.state == states.FAILURE
    assert failing.get(timeout=WAIT, propagate=False).status == "failed"


def test_the_result_is_started_while_performing_and_reports_short_circuits(
    it: Cluster,
) -> None:
    car = it.make_car()
    outbound = action(it, "canvas_outbound")
    result = outbound.later(car)
    it.wait_ready(it.root_of(result))
    assert result.state == states.STARTED
    assert not result.ready()
    outbound.complete_now(car)
    assert result.get(timeout=WAIT) == "succeeded"

    cancelled = action(it, "canvas_cancelled").later(car)
    with pytest.raises(ActionFailed) as raised:
        cancelled.get(timeout=WAIT)
    assert (raised.value.status, raised.value.action_id) == ("cancelled", None)
    assert cancelled.action_id is None  # cancelled in before: no row at all


def test_a_start_that_expired_reports_the_root_cancelled(it: Cluster) -> None:
    car = it.make_car()
    result = action(it, "canvas_drive").later(car, "late", expires="2000-01-01T00:00:00+00:00")
    with pytest.raises(ActionFailed) as raised:
        result.get(timeout=WAIT)
    assert (raised.value.status, raised.value.action_id) == ("cancelled", None)
    it.quiet()
    assert it.actions("canvas_drive") == []


def test_a_chain_stepped_plain_stepped_runs_in_order(it: Cluster) -> None:
    car = it.make_car()
    drive, note = action(it, "canvas_drive"), task(it, "note")
    workflow = chain(drive.s(car, "a"), note.s(car.id, "plain"), drive.si(car, "b"))
    result = workflow.apply_async()
    assert result.get(timeout=WAIT) == "succeeded"
    # The plain task received the first action's final status as its argument.
    assert it.log_tokens(car.id) == ["drive-a", "plain-succeeded", "drive-b"]
    assert [a.status for a in it.actions("canvas_drive")] == ["succeeded", "succeeded"]
    assert all(a.root for a in it.actions("canvas_drive"))
    assert result.parent.get(timeout=WAIT) == "noted-plain"


def test_a_plain_tasks_result_reaches_the_stepped_action_after_its_actor(it: Cluster) -> None:
    car = it.make_car()
    drive, note = action(it, "canvas_drive"), task(it, "note")
    result = (note.s("start", car.id, "first") | drive.s(car)).apply_async()
    assert result.get(timeout=WAIT) == "succeeded"
    # canvas_drive(car, token) ran with the plain task's return value as its token.
    assert it.log_tokens(car.id) == ["first-start", "drive-noted-first"]
    assert it.actions("canvas_drive")[0].arguments == ["noted-first"]


def test_a_failed_action_stops_the_chain_and_runs_link_error(it: Cluster) -> None:
    car = it.make_car()
    fail, note, errback = action(it, "canvas_fail"), task(it, "note"), task(it, "errback")
    first = fail.s(car)
    workflow = chain(first, note.s(car.id, "never"))
    result = workflow.apply_async(link_error=errback.s())
    with pytest.raises(ActionFailed):
        result.get(timeout=WAIT)
    failed = it.wait_named("canvas_fail", 1, "failed")[0]
    it.wait_for("the errback", lambda: it.probe.count(f"errback:{failed.request_id}") == 1)
    it.quiet()
    assert it.log_tokens(car.id) == ["fail"]
    assert it.probe.count(f"errback:{failed.request_id}") == 1


def test_a_chord_of_stepped_actions_fires_its_plain_body_once_all_are_final(it: Cluster) -> None:
    cars = [it.make_car() for _ in range(3)]
    drive, collect = action(it, "canvas_drive"), task(it, "collect")
    header = group(drive.s(car, f"c{car.id}") for car in cars)
    result = chord(header, collect.s()).apply_async()
    assert result.get(timeout=WAIT) == ["succeeded"] * 3
    assert [a.status for a in it.actions("canvas_drive")] == ["succeeded"] * 3
    assert it.probe.count("collected") == 1
    for car in cars:
        assert it.log_tokens(car.id) == [f"drive-c{car.id}"]


def test_a_group_of_stepped_signatures_gives_each_final_status(it: Cluster) -> None:
    car = it.make_car()
    fail, drive = action(it, "canvas_fail"), action(it, "canvas_drive")
    result = group(drive.s(car, "g1"), fail.s(car)).apply_async()
    statuses = result.get(timeout=WAIT, propagate=False)
    assert statuses[0] == "succeeded"
    assert isinstance(statuses[1], ActionFailed)
    assert statuses[1].status == "failed"
    it.quiet()
    it.assert_signals_once()
