"""Lanes, checksum sharing and outbound children, coordinated across worker processes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from celery_stepped.embedded import WorkerProcess
from celery_stepped.lanes import Lane
from celery_stepped.models import Achievement, ParentLink
from tests.integration.conftest import ROOT, Cluster


def links(it: Cluster, step_id: int) -> list[tuple[int | None, str]]:
    with it.stepped.session() as s:
        rows = s.execute(
            select(ParentLink.action_id, ParentLink.state)
            .where(ParentLink.step_id == step_id)
            .order_by(ParentLink.id)
        ).all()
    return [(r.action_id, r.state) for r in rows]


def first_step(it: Cluster, action_id: int) -> int | None:
    steps = it.stepped.get_action(action_id).steps
    return steps[0].id if steps else None


def test_superseding_in_a_lane_while_parents_wait(it: Cluster) -> None:
    car = it.make_car()
    key = f"lane/{car.id}"
    holder = it.later("lane_parent", car, "a")
    (a,) = it.wait_named("lane_job", 1, "performing")
    it.wait_ready(a.id)
    first = it.later("lane_parent", car, "b")
    b = it.wait_named("lane_job", 2)[1]
    it.wait_for("b to queue", lambda: it.stepped.lanes.get(key) == Lane(key, a.id, [b.id]))
    second = it.later("lane_parent", car, "c")
    it.wait_named("lane_job", 3)
    c = it.actions("lane_job")[2]
    it.wait_status(b.id, "superseded")
    # Superseding writes SQL first, then removes b from the lane in Redis.
    it.wait_for("c to queue", lambda: it.stepped.lanes.get(key) == Lane(key, a.id, [c.id]))
    # The first parent now waits on c, and still lists b among its children.
    first_step = it.stepped.get_action(first).steps[0]
    assert [x.id for x in first_step.actions] == [b.id, c.id]
    assert links(it, first_step.id) == [(b.id, "transferred"), (c.id, "waiting")]
    assert first_step.pending_actions_count == 1

    assert it.stepped.complete(a.id) is not None  # from the test process
    it.wait_ready(c.id)
    assert it.stepped.lanes.get(key) == Lane(key, c.id, [])
    assert it.wait_final(holder).status == "succeeded"
    for parent in (first, second):
        assert it.stepped.get_action(parent).status == "performing"
    it.stepped.registry.find(type(car), "lane_job").complete_later(car)

    assert [it.wait_final(p).status for p in (holder, first, second)] == ["succeeded"] * 3
    assert [x.status for x in it.actions("lane_job")] == ["succeeded", "superseded", "succeeded"]
    assert it.log_tokens(car.id) == ["lane-a", "lane-c"]
    it.quiet()  # a lane is released just after its action's status is written
    assert it.stepped.lanes.get(key) is None
    it.assert_signals_once()


def test_two_parents_share_an_action_by_checksum(it: Cluster) -> None:
    car = it.make_car()
    first = it.later("shared_parent", car, 1, "first")
    (shared,) = it.wait_named("shared_job", 1, "performing")
    it.wait_ready(shared.id)
    second = it.later("shared_parent", car, 1, "second")
    it.wait_for(
        "the second parent to attach",
        lambda: [a for a, _ in links(it, first_step(it, second))] == [shared.id],
    )
    assert len(it.actions("shared_job")) == 1
    steps = [it.stepped.get_action(p).steps[0] for p in (first, second)]
    assert [[x.id for x in s.actions] for s in steps] == [[shared.id], [shared.id]]

    it.stepped.registry.find(type(car), "shared_job").complete_later(car)
    assert [it.wait_final(p).status for p in (first, second)] == ["succeeded"] * 2
    assert it.log_tokens(car.id) == ["shared-1"]
    with it.stepped.session() as s:
        assert s.scalar(select(Achievement.checksum_key)) == f"Car/{car.id}/shared_job"

    # Achieved: a third parent's child is skipped without a row, and it succeeds.
    third = it.wait_final(it.later("shared_parent", car, 1, "third"))
    assert third.status == "succeeded"
    assert len(it.actions("shared_job")) == 1
    assert links(it, third.steps[0].id) == [(None, "done")]
    it.quiet()
    it.assert_signals_once()


def test_outbound_and_job_backed_children_and_a_wait(it: Cluster) -> None:
    car = it.make_car()
    root = it.later("outbound_root", car)
    (child,) = it.wait_named("outbound_child", 1, "performing")
    it.wait_ready(child.id)
    it.wait_status(it.wait_named("towing", 1)[0].id, "succeeded")
    it.quiet(0.5)
    assert it.stepped.get_action(root).status == "performing"
    step = it.stepped.get_action(root).steps[0]
    assert step.pending_actions_count == 1

    completed = it.stepped.registry.find(type(car), "outbound_child").complete_now(car)
    assert completed is not None and completed.id == child.id
    done = it.wait_final(root)
    assert done.status == "succeeded"
    tokens = it.log_tokens(car.id)
    assert sorted(tokens[:2]) == ["outbound-sent", "towed-to-garage"]
    assert tokens[2:] == ["outbound-done"]
    assert [s.status for s in done.steps] == ["succeeded", "succeeded"]
    assert sorted(state for _, state in links(it, done.steps[0].id)) == ["done"] * 3
    it.quiet()
    it.assert_signals_once()


def test_the_completing_task_hands_the_lane_on_inline(it: Cluster) -> None:
    """On a real worker: the ``stepped.complete`` task that ends the lane's current action
    performs the next pending one itself; no ``stepped.resume`` message is sent."""
    car = it.make_car()
    key = f"lane/{car.id}"
    first = it.later("lane_job", car, "a")
    it.wait_ready(first)
    second = it.later("lane_job", car, "b")
    it.wait_for("b to queue", lambda: it.stepped.lanes.get(key) == Lane(key, first, [second]))
    job = it.stepped.registry.find(type(car), "lane_job")
    job.complete_later(car)
    it.wait_ready(second)
    assert it.stepped.lanes.get(key) == Lane(key, second, [])
    assert "stepped.resume" not in it.logs()
    job.complete_later(car)
    assert [it.wait_final(x).status for x in (first, second)] == ["succeeded", "succeeded"]
    assert it.log_tokens(car.id) == ["lane-a", "lane-b"]


def test_a_worker_without_the_stepped_queue_says_so_at_start(it: Cluster, tmp_path: Any) -> None:
    """``celery -A app worker`` (no ``-Q stepped``) would leave every tree waiting."""
    log = tmp_path / "no-stepped-queue.log"
    worker = WorkerProcess(
        "tests.integration.worker_app",
        queues="celery",
        concurrency=1,
        env=it.env,
        cwd=str(ROOT),
        logfile=str(log),
    )
    try:
        worker.start()
        text = worker.read_log()
    finally:
        worker.stop()
    assert "consumes celery but not Stepped's queue 'stepped'" in text
    assert "start it with -Q stepped,celery" in text
    for running in it.workers:
        assert "not Stepped's queue" not in running.read_log()
