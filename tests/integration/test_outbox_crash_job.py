"""kill -9 between a step's commit and the send of a job-backed action's job: the outbox
sweep sends the job, the action completes without ``stepped repair`` (issue 11, item 10)."""

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
    """One worker that dies before publishing its first job; sweeps every second."""
    env = {
        worker_app.ENV_CRASH: "job",
        "STEPPED_TEST_SWEEP_AFTER": "1",
        "STEPPED_TEST_SWEEP_EVERY": "1",
    }
    return make_cluster(request, tmp_path_factory, redis_base, env=env)


def test_a_job_survives_kill_9_between_commit_and_send(it: Cluster) -> None:
    car = it.make_car()
    root = it.later("towing", car, "to-garage")
    assert it.wait_final(root).status == "succeeded"
    assert it.probe.redis.get(f"{it.probe.prefix}crashed") is not None  # it did die there
    assert it.car(car.id).log == "towed-to-garage;"  # the job ran once
    assert "outbox sweep sent" in it.logs()
    it.quiet()
    with it.stepped.session() as s:
        assert s.scalar(select(func.count()).select_from(OutboxEntry)) == 0
