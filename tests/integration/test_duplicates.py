"""Every internal message delivered twice: nothing happens twice.

In this module the test process and the worker publish each ``stepped.*`` message
twice under two task ids, so two deliveries of one start, resume, advance, wait,
timeout or complete run concurrently on two processes or one after the other.
Actions, steps and joins are idempotent by their ids: each step advances once, each
child is counted once, each committed body's effect shows once.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from celery_stepped.models import Step
from tests.integration.conftest import Cluster, make_cluster


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_base: str
) -> Cluster:
    """One worker; every internal message is published twice."""
    return make_cluster(request, tmp_path_factory, redis_base, duplicate=True)


def test_a_tree_whose_messages_all_arrive_twice(it: Cluster) -> None:
    car = it.make_car()
    root = it.wait_final(it.later("tree_root", car, 3))
    assert root.status == "succeeded"
    assert len(it.actions("tree_root")) == 1  # the root's start came twice too
    assert len(it.actions("tree_mid")) == 3 and len(it.actions("tree_leaf")) == 6
    tokens = it.log_tokens(car.id)
    assert sorted(tokens) == sorted(
        ["root", "m0", "m1", "m2", *(f"l{m}.{n}" for m in range(3) for n in range(2))]
    )
    it.quiet()
    it.assert_signals_once()


def test_a_fan_out_whose_messages_all_arrive_twice(it: Cluster) -> None:
    car = it.make_car()
    root = it.wait_final(it.later("fan_root", car, 100))
    assert root.status == "succeeded"
    assert it.car(car.id).honks == 100
    assert len(it.actions("fan_leaf")) == 100
    first = root.steps[0]
    assert (first.pending_actions_count, first.unsuccessful_actions_count) == (0, 0)
    it.quiet()
    it.assert_signals_once()


def test_failures_timeouts_waits_and_outbound_completion_arrive_twice(it: Cluster) -> None:
    car = it.make_car()
    failed = it.later("fail_root", car)
    timed = it.later("timeout_root", car)
    outbound = it.later("outbound_root", car)
    it.wait_ready(it.wait_named("outbound_child", 1, "performing")[0].id)
    it.stepped.registry.find(type(car), "outbound_child").complete_later(car)
    assert it.wait_final(failed).status == "failed"
    assert it.wait_final(timed).status == "failed"
    assert it.wait_final(outbound).status == "succeeded"
    assert [a.status for a in it.actions("stuck")] == ["timed_out"]
    assert sorted(a.status for a in it.actions("fail_leaf")) == ["failed"] + ["succeeded"] * 3
    tokens = it.log_tokens(car.id)
    for token in ("fl0.0", "fl0.1", "fl1.0", "fm0", "l9.9", "outbound-sent", "outbound-done"):
        assert tokens.count(token) == 1, token
    it.quiet()
    it.assert_signals_once()
    with it.stepped.session() as s:
        assert s.scalars(select(Step).where(Step.status == "performing")).all() == []
