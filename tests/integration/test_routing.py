"""An action's ``queue=`` routes every message of its own code (issue 13, item 5).

Two workers: one consumes ``stepped,celery``, the other only ``body``. The action
``routed`` (``queue="body"``) starts a child on the Stepped queue, a plain task on
``celery`` and a timed wait. The child completes on the first worker and the task's
report comes back from it, yet every body of ``routed`` runs on the second worker: the
join sends the step to its action's queue instead of advancing it inline.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import Cluster, make_cluster


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_base: str
) -> Cluster:
    """A worker on ``stepped,celery`` and a worker on ``body`` only."""
    cluster = make_cluster(request, tmp_path_factory, redis_base)
    cluster.start_worker(queues="body")
    return cluster


def pids(it: Cluster, name: str) -> set[int]:
    return {int(pid) for pid in it.probe.redis.smembers(f"{it.probe.prefix}pids:{name}")}


def test_every_step_body_runs_on_its_actions_queue(it: Cluster) -> None:
    default_worker, body_worker = it.workers
    car = it.make_car()
    root = it.later("routed", car)
    done = it.wait_final(root)
    assert done.status == "succeeded"
    assert [s.status for s in done.steps] == ["succeeded"] * 3
    assert sorted(it.log_tokens(car.id)[:2]) == ["child", "routed-mail"]
    assert it.log_tokens(car.id)[2:] == ["routed-last"]
    assert it.probe.count("ran:routed-mail") == 1

    routed, child = pids(it, "routed"), pids(it, "routed-child")
    assert routed and routed <= set(body_worker.child_pids())
    assert child and child <= set(default_worker.child_pids())
    it.quiet()
    it.assert_signals_once()
