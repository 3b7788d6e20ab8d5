"""A chain of superseded actions on a real worker: the parents all complete with its end.

Each superseded action keeps the links its superseder did not copy; the completion of
the last superseder counts them all, in the worker, through ``superseded_by_id``.
"""

from __future__ import annotations

from sqlalchemy import select

from celery_stepped.lanes import Lane
from celery_stepped.models import ParentLink
from tests.integration.conftest import Cluster

PARENTS = 5


def waiting_on(it: Cluster, parent_id: int) -> list[int | None]:
    step = it.stepped.get_action(parent_id).steps[0]
    with it.stepped.session() as s:
        query = select(ParentLink.action_id).where(
            ParentLink.step_id == step.id, ParentLink.state == "waiting"
        )
        return list(s.scalars(query.order_by(ParentLink.id)).all())


def test_every_parent_of_a_superseded_chain_completes_with_its_end(it: Cluster) -> None:
    car = it.make_car()
    key = f"lane/{car.id}"
    holder = it.later("lane_parent", car, "a")
    (a,) = it.wait_named("lane_job", 1, "performing")
    it.wait_ready(a.id)
    parents = []
    for n in range(PARENTS):  # one at a time: each child supersedes the previous one
        parents.append(it.later("lane_parent", car, f"p{n}"))
        child = it.wait_named("lane_job", n + 2)[n + 1]
        it.wait_for(
            f"p{n} to queue",
            lambda child=child: it.stepped.lanes.get(key) == Lane(key, a.id, [child.id]),
        )
    jobs = it.actions("lane_job")
    chain, last = jobs[1:-1], jobs[-1]
    assert [j.status for j in chain] == ["superseded"] * (PARENTS - 1)
    assert [j.superseded_by_id for j in chain] == [j.id for j in jobs[2:]]
    # each parent's link was copied once, onto its child's superseder, and stays there
    assert [waiting_on(it, p) for p in parents] == [[j.id] for j in jobs[2:]] + [[last.id]]

    assert it.stepped.complete(a.id) is not None
    it.wait_ready(last.id)
    assert it.wait_final(holder).status == "succeeded"
    assert all(it.stepped.get_action(p).status == "performing" for p in parents)
    it.stepped.registry.find(type(car), "lane_job").complete_later(car)

    assert [it.wait_final(p).status for p in parents] == ["succeeded"] * PARENTS
    for parent in parents:
        step = it.stepped.get_action(parent).steps[0]
        assert (step.pending_actions_count, step.unsuccessful_actions_count) == (0, 0)
        assert waiting_on(it, parent) == []
    assert it.log_tokens(car.id) == ["lane-a", f"lane-p{PARENTS - 1}"]
    it.quiet()
    assert it.stepped.lanes.get(key) is None
    it.assert_signals_once()
