"""Trees on a real worker: depth, fan-out, a failure deep inside, a timeout.

The worker is the pytest plugin's ``stepped_worker``: a Celery worker in a thread of the
test process (a threads pool of two, so joins race as on a prefork worker) on the
module's app, with the integration suite's actions, real Redis and real SQL. Nothing
here kills a worker, so the module starts no worker process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from celery import signals as celery_signals
from sqlalchemy import select

from celery_stepped import Stepped
from celery_stepped.models import Action, ParentLink, Step
from tests.integration.conftest import Cluster, make_cluster


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_base: str
) -> Cluster:
    """The module's app, Stepped instance and probe, without worker processes."""
    return make_cluster(request, tmp_path_factory, redis_base, workers=0)


@pytest.fixture
def celery_worker_pool() -> str:
    """``celery.contrib.pytest``'s pool of the in-process worker."""
    return "threads"


@pytest.fixture
def celery_worker_parameters() -> dict[str, Any]:
    """Two threads."""
    return {"concurrency": 2}


@pytest.fixture
def stepped(it: Cluster) -> Stepped:
    """What the plugin's fixtures work on: the module's instance, emptied before the test."""
    return it.stepped


@pytest.fixture(autouse=True)
def worker(it: Cluster, stepped_worker: Any, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The in-process worker for every test; it records the content type of each internal
    message in the probe, and logs no error but handled exceptions."""

    def record(sender: Any = None, request: Any = None, **_: Any) -> None:
        if request is not None and str(request.name).startswith("stepped."):
            it.probe.redis.hincrby(it.probe.content_key, str(request.content_type), 1)

    celery_signals.task_received.connect(record, weak=False)
    try:
        yield
    finally:
        celery_signals.task_received.disconnect(record)
    errors = [
        r.getMessage()
        for r in caplog.get_records("call")
        if r.levelno >= logging.ERROR and "stepped handled" not in r.getMessage()
    ]
    assert errors == []


def test_three_level_tree(it: Cluster) -> None:
    car = it.make_car()
    root = it.wait_final(it.later("tree_root", car, 3))
    assert root.status == "succeeded"
    tokens = it.log_tokens(car.id)
    assert sorted(t for t in tokens if t.startswith("l")) == [
        f"l{m}.{n}" for m in range(3) for n in range(2)
    ]
    assert sorted(t for t in tokens if t.startswith("m")) == ["m0", "m1", "m2"]
    assert tokens[-1] == "root"
    mids = it.actions("tree_mid")
    assert [a.status for a in mids] == ["succeeded"] * 3
    assert [a.status for a in it.actions("tree_leaf")] == ["succeeded"] * 6
    assert [a.id for a in root.steps[0].actions] == [a.id for a in mids]
    assert [s.status for s in root.steps] == ["succeeded", "succeeded"]
    assert all(it.probe.count(f"ran:leaf{m}.{n}") == 1 for m in range(3) for n in range(2))
    it.quiet()
    it.assert_signals_once()


def test_internal_messages_are_json_although_the_app_default_is_pickle(it: Cluster) -> None:
    assert it.app.conf.task_serializer == "pickle"
    assert it.app.conf.result_backend is None  # Stepped's join needs no result backend
    car = it.make_car()
    assert it.wait_final(it.later("tree_root", car, 1)).status == "succeeded"
    it.quiet()
    # root start, a mid, two leaves; the worker accepts JSON only.
    content_types = it.probe.content_types()
    assert set(content_types) == {"application/json"}
    assert content_types["application/json"] >= 4


def test_fan_out_of_200_children(it: Cluster) -> None:
    car = it.make_car()
    root = it.wait_final(it.later("fan_root", car, 200))
    assert root.status == "succeeded"
    stored = it.car(car.id)
    assert stored.honks == 200
    assert stored.log == "fanned;"
    first = root.steps[0]
    assert (first.status, first.pending_actions_count, first.unsuccessful_actions_count) == (
        "succeeded",
        0,
        0,
    )
    assert len(first.actions) == 200
    assert {a.status for a in first.actions} == {"succeeded"}
    with it.stepped.session() as s:
        states = s.scalars(select(ParentLink.state).where(ParentLink.step_id == first.id)).all()
    assert sorted(set(states)) == ["done"] and len(states) == 200
    # Each one-step child began with its step (on SQLite in the UPDATE that completed it).
    with it.stepped.session() as s:
        began = s.execute(
            select(Action.started_at, Action.completed_at, Step.started_at)
            .join(Step, Step.action_id == Action.id)
            .where(Action.id.in_([a.id for a in first.actions]))
        ).all()
    assert len(began) == 200
    assert all(started == step_started for started, _, step_started in began)
    assert all(done is not None and started <= done for started, done, _ in began)
    it.quiet()
    it.assert_signals_once()
    assert it.probe.count(f"step_completed:{first.id}") == 1


def test_a_failure_deep_in_the_tree_fails_every_ancestor(it: Cluster) -> None:
    car = it.make_car()
    root = it.wait_final(it.later("fail_root", car))
    assert root.status == "failed"
    mids = {a.arguments[0]: a for a in it.actions("fail_mid")}
    assert (mids[0].status, mids[1].status) == ("succeeded", "failed")
    leaves = {tuple(a.arguments): a.status for a in it.actions("fail_leaf")}
    assert leaves == {
        (0, 0): "succeeded",
        (0, 1): "succeeded",
        (1, 0): "succeeded",
        (1, 1): "failed",
    }
    tokens = it.log_tokens(car.id)
    # The failing body's own append rolled back; the failed branch never closed.
    assert sorted(tokens) == ["fl0.0", "fl0.1", "fl1.0", "fm0"]
    assert [(s.status, s.unsuccessful_actions_count) for s in root.steps] == [("failed", 1)]
    failed_mid = it.stepped.get_action(mids[1].id)
    assert [(s.status, s.unsuccessful_actions_count) for s in failed_mid.steps] == [("failed", 1)]
    it.quiet()
    it.assert_signals_once()


def test_a_timeout_fails_the_parent_step(it: Cluster) -> None:
    car = it.make_car()
    root = it.wait_final(it.later("timeout_root", car))
    assert root.status == "failed"
    (stuck,) = it.actions("stuck")
    assert stuck.status == "timed_out"
    assert stuck.completed_at is not None and stuck.started_at is not None
    assert (stuck.completed_at - stuck.started_at).total_seconds() >= 1
    assert [a.status for a in it.actions("tree_leaf")] == ["succeeded"]
    assert it.log_tokens(car.id) == ["l9.9"]
    assert [(s.status, s.unsuccessful_actions_count) for s in root.steps] == [("failed", 1)]
    it.quiet()
    assert it.stepped.lanes.count() == 0
    it.assert_signals_once()


def test_a_one_second_wait_holds_its_step(it: Cluster) -> None:
    car = it.make_car()
    root = it.wait_final(it.later("nap", car))
    assert root.status == "succeeded"
    waited, woke = root.steps
    assert waited.started_at is not None and waited.completed_at is not None
    assert (waited.completed_at - waited.started_at).total_seconds() >= 1
    assert woke.started_at is not None and woke.started_at >= waited.completed_at
    assert it.log_tokens(car.id) == ["woke"]
    it.quiet()
    it.assert_signals_once()


def test_no_step_is_left_open(it: Cluster) -> None:
    car = it.make_car()
    it.wait_final(it.later("tree_root", car, 2))
    it.quiet()
    with it.stepped.session() as s:
        open_steps = s.scalars(select(Step).where(Step.status == "performing")).all()
        open_actions = s.scalars(select(Action).where(Action.status == "performing")).all()
    assert open_steps == [] and open_actions == []
