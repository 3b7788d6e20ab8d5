"""Workers killed with SIGKILL in the middle of a step body: the tree still completes.

The first kill takes the whole worker (main process and pool): its unacknowledged
message stays in Redis until the broker's ``visibility_timeout`` (4 s in this module)
restores it, and a newly started worker runs it again. The second kill takes only the
pool process running the body: the worker sees the process lost and, with
``reject_on_worker_lost``, requeues the message at once. Both redeliveries carry
Redis's ``redelivered`` flag, so Stepped follows up the work the dead run committed.

Step bodies append to the car's log in SQL; the log shows every effect exactly once
although the interrupted bodies ran twice.
"""

from __future__ import annotations

import os
import signal

import pytest
from sqlalchemy import select

from celery_stepped.models import Action, Step
from tests.integration.conftest import Cluster, make_cluster

VISIBILITY_TIMEOUT = 4


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_base: str
) -> Cluster:
    """One worker whose broker restores unacknowledged messages after 4 s."""
    return make_cluster(
        request, tmp_path_factory, redis_base, visibility_timeout=VISIBILITY_TIMEOUT
    )


def test_killed_workers_redeliver_and_every_effect_applies_once(it: Cluster) -> None:
    car = it.make_car()
    first_worker = it.workers[0]
    root = it.later("blocking_root", car, 3)

    # 1. The blocker's second step body blocks; kill -9 its whole worker.
    pid = it.wait_for("the blocker's second body", lambda: it.probe.entered("body"))
    assert pid in first_worker.child_pids()
    first_worker.kill()
    it.workers.remove(first_worker)
    assert it.log_tokens(car.id) == ["blocker-1"] or sorted(it.log_tokens(car.id)) == ["blocker-1"]
    it.probe.release("body")

    # 2. A new worker gets the message back after the visibility timeout and runs the
    #    body again. The blocker completes, the root's first step advances and the
    #    root's second body blocks: kill -9 only the pool process running it.
    second_worker = it.start_worker()
    pid = it.wait_for("the root's second body", lambda: it.probe.entered("root-2"))
    assert pid in second_worker.child_pids()
    assert it.probe.count("entered:body") == 2
    os.kill(pid, signal.SIGKILL)
    it.probe.release("root-2")

    # 3. The worker requeues the lost message; the redelivery finds the blocker final,
    #    follows up its parent step and runs the root's remaining steps.
    done = it.wait_final(root)
    assert done.status == "succeeded"
    assert it.log_tokens(car.id) == ["blocker-1", "blocker-2", "root-2", "root-3"]
    assert it.car(car.id).honks == 3
    assert it.probe.count("ran:blocker-1") == 1
    assert it.probe.count("ran:blocker-2") == 2
    assert it.probe.count("ran:blocking-root-2") == 2
    assert [s.status for s in done.steps] == ["succeeded"] * 3
    it.quiet()
    it.assert_signals_once(allowed_errors=("WorkerLostError", "SIGKILL"))
    with it.stepped.session() as s:
        assert s.scalars(select(Action.status).where(Action.status != "succeeded")).all() == []
        assert s.scalars(select(Step.status).where(Step.status != "succeeded")).all() == []
    log = second_worker.read_log()
    assert "SIGKILL" in log or "WorkerLostError" in log
