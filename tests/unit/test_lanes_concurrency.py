"""Concurrent joins into one lane on real Redis and SQL, from threads.

Superseding: one pending action left, no parent step lost.

1,000 actions join the lane ``Car/maintenance`` while an outbound action holds it:
125 parent actions each start 8 of them in one step. The children's ``stepped.start``
jobs run from 8 threads at once (each with its own share of the jobs), on real Redis
and SQL. Each join supersedes the one pending action, which carries every parent step
that waits so far; the parents are 125 (not 1,000) because moving a parent to the
newcomer is a row update per parent and supersede (API.md 11: the parent step gains
the newcomer), quadratic in a chain this long.

Sharing: children with the checksum of the lane's performing action attach to it
while another thread completes it; every parent still completes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from celery_stepped import Stepped
from celery_stepped.lanes import Lane
from celery_stepped.messages import Message
from celery_stepped.models import Action, ParentLink, Step
from celery_stepped.testing import perform_stepped_actions
from tests.conftest import load_car
from tests.models import Car
from tests.unit.test_lanes import SHOP, define_shop, lane_key, redis_keys, succeed_outbound

PARENTS, CHILDREN = 125, 8  # 1,000 joins: CI runs this on both backends
ACTIONS = PARENTS * CHILDREN
THREADS = 8


def run_in_threads(
    stepped: Stepped, jobs: list[Message], *others: Callable[[], None], threads: int = THREADS
) -> list[BaseException]:
    """Perform ``jobs`` from ``threads`` threads at once (each its own share), with
    ``others`` in threads of their own; return what they raised."""
    barrier = threading.Barrier(threads + len(others))
    errors: list[BaseException] = []

    def perform(share: list[Message]) -> None:
        for job in share:
            stepped.core.run_message(job)

    def work(task: Callable[[], None]) -> None:
        try:
            barrier.wait()
            task()
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    tasks = [lambda share=jobs[i::threads]: perform(share) for i in range(threads)]
    threads_ = [threading.Thread(target=work, args=(task,)) for task in [*tasks, *others]]
    for thread in threads_:
        thread.start()
    for thread in threads_:
        thread.join(timeout=100)
    assert not any(thread.is_alive() for thread in threads_)
    return errors


def parent_waits(stepped: Stepped, parent_ids: list[int]) -> list[tuple[int, int | None, int]]:
    """(parent action, child it waits on, pending count) of every waiting parent link."""
    with stepped.session() as s:
        rows = s.execute(
            select(Step.action_id, ParentLink.action_id, Step.pending_actions_count)
            .join(ParentLink, ParentLink.step_id == Step.id)
            .where(Step.action_id.in_(parent_ids), ParentLink.state == "waiting")
            .order_by(Step.action_id)
        ).all()
    return [(row[0], row[1], row[2]) for row in rows]


def chain_ends(stepped: Stepped) -> dict[int, int]:
    """For every action, the last of its chain of superseders (itself if not superseded)."""
    with stepped.session() as s:
        by = {i: by_id for i, by_id in s.execute(select(Action.id, Action.superseded_by_id))}
    ends = {}
    for action_id in by:
        end = action_id
        while by.get(end) is not None:
            end = by[end]
        ends[action_id] = end
    return ends


def statuses(stepped: Stepped, name: str) -> Counter[str]:
    with stepped.session() as s:
        rows = s.execute(
            select(Action.status, func.count()).where(Action.name == name).group_by(Action.status)
        ).all()
    return Counter({status: int(n) for status, n in rows})


@pytest.mark.timeout(300)  # 1,000 joins from 8 threads: 20-30 s on 2 busy cores
def test_concurrent_joins_into_an_occupied_lane(stepped: Stepped, car: Car) -> None:
    shop = define_shop(stepped)
    batch = stepped.app.stepped_action("batch", actor=Car, concurrency_key=lambda c, n: f"b/{n}")

    @batch.step
    def order(step: Any, car: Car, n: int) -> None:
        for child in range(CHILDREN):
            step.do(shop.paint, n, child)

    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        parents = [batch.now(car, n).id for n in range(PARENTS)]
        starts = jobs.take("action")
        assert len(starts) == ACTIONS

        errors = run_in_threads(stepped, starts)
        assert errors == []
        assert jobs.enqueued == []  # nothing may perform while the lane is held

        assert statuses(stepped, "paint") == Counter(pending=1, superseded=ACTIONS - 1)
        with stepped.session() as s:
            pending = s.scalar(select(Action.id).where(Action.status == "pending"))
        assert pending is not None
        # every parent step waits on the one pending action: each waiting link is on it
        # or on an action superseded into it, and the step counts each of them
        waits = parent_waits(stepped, parents)
        ends = chain_ends(stepped)
        assert {ends[child] for _, child, _ in waits} == {pending}
        per_parent = Counter(parent for parent, _, _ in waits)
        assert sorted(per_parent) == sorted(parents)
        assert all(count == per_parent[parent] for parent, _, count in waits)
        with stepped.session() as s:  # one record per child started, at most one copy each
            link_rows = s.scalar(select(func.count()).select_from(ParentLink))
        assert ACTIONS < (link_rows or 0) < 2 * ACTIONS

        # the lane: the held action and one pending action, O(1) keys and members
        pending_key, state_key = (
            lane_key(stepped, SHOP, "pending"),
            lane_key(stepped, SHOP, "state"),
        )
        assert stepped.redis.zcard(pending_key) == 1
        assert stepped.lanes.get(SHOP) == Lane(SHOP, held.id, [pending])
        fields = {k.decode() for k in stepped.redis.hkeys(state_key)}
        assert fields == {"current", "checksum", "seq", f"cs:{pending}"}
        assert int(stepped.redis.hget(state_key, "seq") or 0) == ACTIONS
        assert [k for k in redis_keys(stepped) if SHOP in k] == [pending_key, state_key]

        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)

    assert statuses(stepped, "paint") == Counter(succeeded=1, superseded=ACTIONS - 1)
    assert statuses(stepped, "batch") == Counter(succeeded=PARENTS)
    assert statuses(stepped, "hold") == Counter(succeeded=1)
    assert load_car(stepped, car.id).honks == 1
    assert redis_keys(stepped) == []


def test_sharing_races_the_completion_of_the_shared_action(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    visit = app.stepped_action("visit", actor=Car, outbound=True, checksum=lambda c, p: p)

    @visit.step
    def go(step: Any, car: Car, place: str) -> None:
        car.note(place)

    @app.stepped_action(concurrency_key=lambda car, n: f"trip/{n}")
    def trip(step: Any, car: Car, n: int) -> None:
        step.do(visit, "paris")

    count = 300
    with stepped.capture() as jobs:
        shared = visit.now(car, "paris")
        parents = [trip.now(car, n).id for n in range(count)]
        starts = jobs.take("action")

        def attached() -> int:
            with stepped.session() as s:
                return int(
                    s.scalar(
                        select(func.count())
                        .select_from(ParentLink)
                        .where(ParentLink.action_id == shared.id)
                    )
                    or 0
                )

        def complete_midway() -> None:
            deadline = time.monotonic() + 60
            while attached() < count // 4 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert stepped.complete(shared.id) is not None

        errors = run_in_threads(stepped, starts, complete_midway, threads=4)
        assert errors == []
        assert attached() >= count // 4
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)

    assert statuses(stepped, "trip") == Counter(succeeded=count)
    with stepped.session() as s:
        outcomes = s.execute(
            select(ParentLink.state, ParentLink.outcome, func.count())
            .join(Step, Step.id == ParentLink.step_id)
            .where(Step.action_id.in_(parents))
            .group_by(ParentLink.state, ParentLink.outcome)
        ).all()
    by_state = {(state, outcome): n for state, outcome, n in outcomes}
    assert by_state.pop(("done", "succeeded")) == count  # one outcome per parent step
    # late children may have queued behind the completing action and superseded
    # each other: their parents moved on, no other outcome was counted
    assert set(by_state) <= {("transferred", "superseded"), ("released", "superseded")}
    visits = statuses(stepped, "visit")
    assert set(visits) <= {"succeeded", "superseded"} and visits["succeeded"] >= 1
    assert redis_keys(stepped) == []
