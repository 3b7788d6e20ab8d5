"""Healing through a real worker: its sweep resumes a lane front whose message was lost,
heals the lanes of children whose start never arrived, and sends again a timed wait that
never arrived.

The worker sweeps every second. The test completes a lane's outbound action from
outside (as a webhook does) while capturing what that sends, then drops it: the
``stepped.resume`` of the action promoted to the lane's front is lost, as when Redis
loses the broker's data. The worker's sweep finds the action pending at the front on
two sweeps in a row and resumes it.
"""

from __future__ import annotations

import time

import pytest
from celery.result import AsyncResult

from tests.integration.conftest import Cluster, make_cluster
from tests.models import Car


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_base: str
) -> Cluster:
    env = {"STEPPED_TEST_SWEEP_AFTER": "1", "STEPPED_TEST_SWEEP_EVERY": "1"}
    return make_cluster(request, tmp_path_factory, redis_base, env=env)


def waiting(it: Cluster, action_id: int) -> bool:
    return any(action_id in lane.pending_ids for lane in it.stepped.lanes.all())


def test_the_sweep_resumes_a_lane_front_whose_resume_message_was_lost(it: Cluster) -> None:
    car = it.make_car()
    first = it.later("lane_job", car, "a")
    it.wait_ready(first)
    second = it.later("lane_job", car, "b")
    it.wait_for("the second job to wait in the lane", lambda: waiting(it, second))
    with it.stepped.capture() as jobs:
        it.stepped.complete(first)  # promotes the second; its resume is captured ...
        assert [m.task for m in jobs.take()] == ["stepped.resume"]  # ... and lost
    assert it.wait_ready(second).status == "performing"
    assert it.log_tokens(car.id) == ["lane-a", "lane-b"]
    assert "stepped heal: pending action(s)" in it.logs()


def test_the_sweep_sends_again_child_starts_and_a_wait_that_never_arrived(it: Cluster) -> None:
    """Here the test process runs the roots' first steps (``now()`` in a capture) and
    drops what they send: two children's starts and a timed wait, as if a worker took
    them from Redis and was killed before Kombu recorded them. The roots' steps wrote
    the children's pending rows (``child_rows``), so the sweep finds two pending children
    in no lane: it rebuilds their lanes from SQL and resumes them. The wait's link is
    unclaimed and overdue: the sweep sends the wait again. Each on two sweeps in a row."""
    car = it.make_car()
    with it.stepped.capture() as jobs:
        fan = it.stepped.registry.find(type(car), "fan_root").now(car, 2)
        nap = it.stepped.registry.find(type(car), "nap").now(car)
        assert sorted(m.task for m in jobs.take()) == [
            "stepped.start",
            "stepped.start",
            "stepped.wait",
        ]
    assert it.wait_final(fan.id).status == "succeeded"
    assert it.wait_final(nap.id).status == "succeeded"
    assert sorted(it.log_tokens(car.id)) == ["fanned", "woke"]
    leaves = it.actions("fan_leaf")
    assert [a.status for a in leaves] == ["succeeded", "succeeded"]
    healed = lane_healed(it)  # the children: each had its lane healed, or followed one
    assert {a.id for a in leaves} & healed, f"no heal of {[a.id for a in leaves]} in {healed}"
    assert "1 member message(s)" in it.logs()  # the wait
    assert "never arrived: sent again" in it.logs()


def lane_healed(it: Cluster) -> set[int]:
    """The ids of the pending actions whose lanes a sweep healed, from every worker's log
    (``stepped heal: pending action(s) 7, 8 had nothing to move them on: ...``)."""
    found: set[int] = set()
    for line in it.whole_logs().splitlines():
        head, sep, _ = line.partition(" had nothing to move them on")
        if sep:
            found.update(int(i) for i in head.rsplit("pending action(s) ", 1)[1].split(", "))
    return found


def test_the_sweep_resumes_an_action_begun_but_killed_before_its_first_step(
    it: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test process begins ``fan_root`` (``now()``) and dies, as far as the action
    knows, before its first step commits: performing, with no step row, and no message
    that would carry it on. The worker's sweep finds it on two sweeps and resumes it."""
    performer = it.stepped.core.performer

    def killed(*_: object) -> None:
        raise RuntimeError("killed before the first step committed")

    monkeypatch.setattr(performer, "run_first_steps", killed)
    # Begun on its own, as a lane handoff begins it (an action its start created
    # begins in its first step's transaction: nothing half done to resume there).
    monkeypatch.setattr(performer, "begin_and_run", lambda *_: None)
    car = it.make_car()
    with pytest.raises(RuntimeError):
        it.stepped.registry.find(type(car), "fan_root").now(car, 1)
    monkeypatch.undo()
    (root,) = [a for a in it.actions("fan_root") if a.actor_id == str(car.id)]
    assert root.status == "performing"
    assert it.wait_final(root.id).status == "succeeded"
    assert it.log_tokens(car.id) == ["fanned"]
    assert "work a killed task left half done: resume" in it.logs()


def test_the_sweep_leaves_a_later_start_waiting_behind_a_backlog(it: Cluster) -> None:
    """``later()`` keeps its start's outbox entry until the start runs, so that a start
    the broker lost is sent again. A start that only waits in a busy queue is late, not
    lost: the sweep leaves it there instead of queueing a second copy on every sweep.

    Two blocked bodies hold both pool processes while three roots wait in the queue for
    several sweeps; each root's start then runs once."""
    block_the_pool(it, "backlog")
    cars = [it.make_car() for _ in range(3)]  # a lane each: none supersedes another
    fan_root = it.stepped.registry.find(Car, "fan_root")
    requests = [fan_root.later(car, 0).id for car in cars]
    it.wait_for(
        "a sweep that left them queued", lambda: "later() start(s) not sent again yet" in it.logs()
    )
    time.sleep(2.5)  # more sweeps (every second) while they wait
    it.probe.release("backlog")
    roots = [it.root_of(AsyncResult(request)) for request in requests]
    assert [it.wait_final(root).status for root in roots] == ["succeeded"] * 3
    log = it.whole_logs()
    assert [log.count(f"[{request}] received") for request in requests] == [1, 1, 1]


def block_the_pool(it: Cluster, name: str) -> None:
    """Hold both pool processes in ``blocker`` bodies until ``it.probe.release(name)``:
    what is sent meanwhile waits in the queue (a backlog)."""
    for car in (it.make_car(), it.make_car()):
        it.stepped.registry.find(type(car), "blocker").later(car, name)
    it.wait_for("both pool processes blocked", lambda: it.probe.count(f"entered:{name}") == 2)


def test_the_sweep_leaves_children_whose_starts_wait_behind_a_backlog(it: Cluster) -> None:
    """Children a step wrote wait for their starts in a busy queue: they are pending in
    no lane, which is also what a lost start looks like. Behind a backlog the sweep
    leaves them alone (late, not lost); they run once, from their own starts, when the
    queue moves again."""
    block_the_pool(it, "children")
    car = it.make_car()
    root = it.stepped.registry.find(type(car), "fan_root").now(car, 2)  # its step runs here
    leaves = it.actions("fan_leaf")[-2:]
    assert [it.stepped.lanes.get(leaf.concurrency_key) for leaf in leaves] == [None, None]
    time.sleep(4)  # four sweeps (every second, of rows older than a second)
    assert [a.status for a in it.actions("fan_leaf")[-2:]] == ["pending", "pending"]
    assert not {leaf.id for leaf in leaves} & lane_healed(it)
    it.probe.release("children")
    assert it.wait_final(root.id).status == "succeeded"
    assert it.log_tokens(car.id) == ["fanned"]
    assert it.car(car.id).honks == 2  # each child ran once
