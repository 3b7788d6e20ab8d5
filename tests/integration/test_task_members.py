"""Plain Celery tasks as members of a step's join (``step.task``), on real workers.

Issue 13, item 4: a task member counts once when it returns (succeeded) or raises,
is revoked, expires or outlives its ``timeout=`` (failed, timed out). The worker's
broker restores unacknowledged messages after 4 s, as in ``test_redelivery.py``, so a
member whose pool process is killed with SIGKILL runs again and still counts once.
"""

from __future__ import annotations

import os
import signal

import pytest
from sqlalchemy import select

from celery_stepped.models import ParentLink
from celery_stepped.rendering import tree_lines
from celery_stepped.views import action_tree
from tests.integration.conftest import Cluster, make_cluster


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_base: str
) -> Cluster:
    """One worker whose broker restores unacknowledged messages after 4 s."""
    return make_cluster(request, tmp_path_factory, redis_base, visibility_timeout=4)


def member_rows(it: Cluster, step_id: int) -> list[tuple[str, str, str | None]]:
    with it.stepped.session() as s:
        rows = s.execute(
            select(ParentLink.kind, ParentLink.state, ParentLink.outcome)
            .where(ParentLink.step_id == step_id)
            .order_by(ParentLink.id)
        ).all()
    return [tuple(row) for row in rows]


def test_three_task_members_one_failing_fail_the_step(it: Cluster) -> None:
    car = it.make_car()
    root = it.later("members_three", car)
    done = it.wait_final(root)
    assert done.status == "failed"
    step = done.steps[0]
    assert (step.status, step.pending_actions_count, step.unsuccessful_actions_count) == (
        "failed",
        0,
        1,
    )
    assert member_rows(it, step.id) == [
        ("task", "done", "succeeded"),
        ("task", "done", "failed"),
        ("task", "done", "succeeded"),
    ]
    assert sorted(it.log_tokens(car.id)) == ["m1", "m3"]
    lines = "\n".join(tree_lines(action_tree(it.stepped, root)))
    assert "task tests.canvas.mail(" in lines and ": failed in" in lines
    it.quiet()
    it.assert_signals_once(allowed_errors=("bounced",))


def test_expired_and_timed_out_members_count_as_unsuccessful(it: Cluster) -> None:
    car = it.make_car()
    root = it.later("members_late", car)
    done = it.wait_final(root)
    assert done.status == "failed"
    assert member_rows(it, done.steps[0].id) == [
        ("task", "done", "failed"),  # expired before a worker got it: revoked, no run
        ("task", "done", "timed_out"),  # still blocked when its 0.5 s were up
        ("task", "done", "succeeded"),
    ]
    assert done.steps[0].unsuccessful_actions_count == 2
    # The slow task finishes after its timeout: its report changes nothing.
    it.probe.release("slow")
    it.wait_for("the slow member to finish", lambda: "slow" in it.log_tokens(car.id))
    it.quiet()
    assert member_rows(it, done.steps[0].id)[1] == ("task", "done", "timed_out")
    assert it.probe.count("ran:expired") == 0
    it.assert_signals_once(allowed_errors=("bounced",))


def test_a_member_redelivered_after_kill_9_counts_once(it: Cluster) -> None:
    car = it.make_car()
    worker = it.workers[0]
    root = it.later("members_redelivered", car)

    # 1. The blocking member runs: kill -9 the pool process running it. The worker
    #    requeues the lost message (reject_on_worker_lost) and the task runs again.
    pid = it.wait_for("the blocking member", lambda: it.probe.entered("member"))
    assert pid in worker.child_pids()
    os.kill(pid, signal.SIGKILL)
    it.probe.release("member")

    # 2. Its report advances the step inline, in the stepped.member task; the next body
    #    blocks: kill -9 that pool process too. The redelivered stepped.member finds the
    #    member counted and follows the step up.
    pid = it.wait_for("the second body", lambda: it.probe.entered("members-after"))
    os.kill(pid, signal.SIGKILL)
    it.probe.release("members-after")

    done = it.wait_final(root)
    assert done.status == "succeeded"
    assert it.probe.count("ran:member") == 2
    assert it.probe.count("ran:members-after") == 2
    step = done.steps[0]
    assert (step.pending_actions_count, step.unsuccessful_actions_count) == (0, 0)
    assert member_rows(it, step.id) == [
        ("task", "done", "succeeded"),
        ("task", "done", "succeeded"),
    ]
    assert sorted(it.log_tokens(car.id)) == ["after", "member", "quick"]
    it.quiet()
    it.assert_signals_once(allowed_errors=("WorkerLostError", "SIGKILL", "bounced"))
