"""kill -9 between a transition's commit and its send: the outbox sweep sends it.

A pool process commits a step whose members are a timed wait (or a job-backed child's
job), and is killed (SIGKILL) just before it publishes the message. Without the
outbox the step would wait forever: the redelivered message re-sends unclaimed child
actions only. With it, the message was staged in the step's transaction, and the
worker's sweep (every second in this module) sends it.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from celery_stepped.models import OutboxEntry
from tests.integration import worker_app
from tests.integration.conftest import Cluster, make_cluster


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_base: str
) -> Cluster:
    """One worker that dies before publishing its first timed wait; sweeps every second."""
    env = {
        worker_app.ENV_CRASH: "wait",
        "STEPPED_TEST_SWEEP_AFTER": "1",
        "STEPPED_TEST_SWEEP_EVERY": "1",
    }
    return make_cluster(request, tmp_path_factory, redis_base, env=env)


def test_a_timed_wait_survives_kill_9_between_commit_and_send(it: Cluster) -> None:
    car = it.make_car()
    root = it.later("nap", car)
    assert it.wait_final(root).status == "succeeded"
    assert it.probe.redis.get(f"{it.probe.prefix}crashed") is not None  # it did die there
    assert it.log_tokens(car.id) == ["woke"]
    assert "outbox sweep sent" in it.logs()
    it.quiet()
    with it.stepped.session() as s:
        assert s.scalar(select(func.count()).select_from(OutboxEntry)) == 0
