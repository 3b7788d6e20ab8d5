"""``stepped.repair``: Redis lost its data; SQL rebuilds the lanes and in-flight work."""

from __future__ import annotations

from celery_stepped.effects import Delivery
from celery_stepped.lanes import Lane
from tests.integration.conftest import Cluster


def test_repair_rebuilds_flushed_lanes_and_the_tree_completes(it: Cluster) -> None:
    car = it.make_car()
    key = f"lane/{car.id}"
    holder = it.later("lane_parent", car, "a")
    (a,) = it.wait_named("lane_job", 1, "performing")
    it.wait_ready(a.id)
    waiter = it.later("lane_parent", car, "b")
    b = it.wait_named("lane_job", 2)[1]
    it.wait_for("b to queue", lambda: it.stepped.lanes.get(key) == Lane(key, a.id, [b.id]))
    it.quiet()
    assert it.stepped.repair().lines == []  # healthy: nothing to do

    it.stepped.lanes.clear()  # Redis loses the lanes
    assert it.stepped.lanes.count() == 0
    dry = it.stepped.repair()
    assert not dry.applied
    # Every open action's lane: the two parents' and the shared lane of the lane jobs.
    assert sorted(dry.lines) == sorted(
        [
            f"lane 'parent/{car.id}/a': missing -> current {holder}, pending none",
            f"lane 'parent/{car.id}/b': missing -> current {waiter}, pending none",
            f"lane {key!r}: missing -> current {a.id}, pending {b.id}",
        ]
    )
    assert it.stepped.lanes.count() == 0  # a dry run changes nothing

    report = it.stepped.repair(apply=True)
    assert report.applied and report.lines == dry.lines
    assert {lane["key"]: lane["current_id"] for lane in report.to_dict()["lanes"]}[key] == a.id
    assert it.stepped.lanes.get(key) == Lane(key, a.id, [b.id])
    assert it.stepped.repair().lines == []

    # The repaired lane works: completing a promotes b, completing b ends both trees.
    it.stepped.complete(a.id)
    it.wait_ready(b.id)
    it.stepped.complete(b.id)
    assert [it.wait_final(r).status for r in (holder, waiter)] == ["succeeded"] * 2
    assert it.log_tokens(car.id) == ["lane-a", "lane-b"]
    it.quiet()  # a lane is released just after its action's status is written
    assert it.stepped.lanes.count() == 0
    it.assert_signals_once()


def test_repair_resends_what_a_flushed_broker_lost(it: Cluster) -> None:
    it.stop_workers()  # nothing consumes: the messages sit in Redis, then vanish
    car = it.make_car()
    key = f"lane/{car.id}"
    holder = it.stepped.registry.find(type(car), "lane_parent").now(car, "a")
    second = it.stepped.registry.find(type(car), "lane_parent").now(car, "b")
    third = it.stepped.registry.find(type(car), "lane_parent").now(car, "c")
    tree = it.stepped.registry.find(type(car), "tree_root").now(car, 2)
    assert tree.status == "performing"
    broker = it.broker
    assert broker.llen("stepped") == 5  # three lane jobs and two mids never started
    it.flush_broker()
    it.stepped.lanes.clear()

    report = it.stepped.repair(apply=True)
    # The children's rows were written with their parents' steps: repair finds them
    # pending in no lane, rebuilds their lanes from SQL (the newest lane job supersedes
    # the two older ones, as their lane would have) and resumes each lane's front.
    assert [r for r in report.resends if r.task == "stepped.start"] == []
    jobs = [a.id for a in it.actions("lane_job")]
    mids = [a.id for a in it.actions("tree_mid")]
    assert len(jobs) == 3 and len(mids) == 2
    resumed = sorted(r.target for r in report.resends if r.task == "stepped.resume")
    assert resumed == sorted([jobs[-1], *mids])
    assert {lane.key for lane in report.lanes} == {
        key,
        f"mid/{car.id}/0",
        f"mid/{car.id}/1",
        f"parent/{car.id}/a",
        f"parent/{car.id}/b",
        f"parent/{car.id}/c",
        f"Car/{car.id}/tree_root",
    }
    it.start_worker()
    it.wait_ready(jobs[-1])
    it.stepped.complete(jobs[-1])  # counts for all three parents (superseded links)
    results = [it.wait_final(x.id).status for x in (holder, second, third, tree)]
    assert results == ["succeeded"] * 4
    statuses = [x.status for x in it.actions("lane_job")]
    assert statuses == ["superseded", "superseded", "succeeded"]
    it.quiet()
    assert it.stepped.repair().lines == []


def test_repair_reissues_advances_and_resumes_that_were_lost(it: Cluster) -> None:
    it.stop_workers()
    car = it.make_car()
    find = it.stepped.registry.find
    with it.stepped.capture() as jobs:  # set up in this process: a, b and a shared job
        holder = find(type(car), "lane_parent").now(car, "a")
        jobs.perform_all()
        waiter = find(type(car), "lane_parent").now(car, "b")
        jobs.perform_all()
        sharer = find(type(car), "shared_parent").now(car, 7, "x")
        jobs.perform_all()
    a, b = it.actions("lane_job")
    (shared,) = it.actions("shared_job")
    assert (a.status, b.status, shared.status) == ("performing", "pending", "performing")

    # Completed from outside, with no worker: the advances and b's resume are sent to
    # the broker, which then loses them.
    it.stepped.complete(shared.id)
    it.stepped.complete(a.id)
    broker = it.broker
    assert broker.llen("stepped") == 3
    it.flush_broker()
    holder_step, sharer_step = (it.stepped.get_action(x.id).steps[0].id for x in (holder, sharer))
    resends = {(r.task, r.target) for r in it.stepped.repair().resends}
    assert resends == {
        ("stepped.advance", holder_step),
        ("stepped.advance", sharer_step),
        ("stepped.resume", b.id),
    }
    # A resume that died right after b began: performing, but its step never ran.
    it.stepped.core.performer.begin(b.id, Delivery())
    report = it.stepped.repair()
    assert ("stepped.resume", b.id) in {(r.task, r.target) for r in report.resends}
    assert f"send stepped.resume({b.id}): lane_job: step 1 never ran" in report.lines

    it.stepped.repair(apply=True)
    it.start_worker()
    assert it.wait_final(holder.id).status == "succeeded"
    assert it.wait_final(sharer.id).status == "succeeded"
    it.wait_ready(b.id)
    it.stepped.complete(b.id)
    assert it.wait_final(waiter.id).status == "succeeded"
    assert sorted(it.log_tokens(car.id)) == ["lane-a", "lane-b", "shared-7"]
    it.quiet()
    assert it.stepped.repair().lines == []
    it.assert_signals_once()
