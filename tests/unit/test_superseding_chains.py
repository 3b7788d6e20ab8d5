"""Superseding at a constant cost: a superseded action keeps its parent links.

Each request into a lane writes the same rows however many requests the lane absorbed;
the links left on superseded actions count when the end of their chain of superseders
completes, and the deadlock check and repair follow those chains. Real Redis, real SQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, select, update

from celery_stepped import Stepped, keys
from celery_stepped.contrib.flask.sharing import parents_of
from celery_stepped.effects import Effects
from celery_stepped.models import Action, ParentLink, Step
from celery_stepped.testing import handle_stepped_action_exceptions, perform_stepped_actions
from celery_stepped.views import action_tree
from tests.conftest import load_car, stored_actions
from tests.models import Car

LANE = "Car/booth"
WRITES = ("INSERT", "UPDATE", "DELETE")


@dataclass
class Booth:
    hold: Any
    paint: Any
    order: Any
    boss: Any
    quick: Any


def define_booth(stepped: Stepped) -> Booth:
    """``hold`` (outbound) keeps the booth lane; each ``order`` (a lane of its own) starts
    a ``paint`` in it; ``boss`` (lane ``Car/boss``) starts one too; a ``paint`` given
    ``"polish"`` starts ``polish`` in the boss's lane; ``quick`` succeeds at once."""
    app = stepped.app

    @app.stepped_action(outbound=True, concurrency_key=LANE)
    def hold(car: Car) -> None:
        car.note("hold")

    @app.stepped_action(concurrency_key="Car/boss")
    def polish(car: Car) -> None:
        car.note("polish")

    paint = app.stepped_action("paint", actor=Car, concurrency_key=LANE)

    @paint.step
    def coat(step: Any, car: Car, what: Any) -> None:
        car.honk()
        if what == "polish":
            step.do(polish)

    order = app.stepped_action("order", actor=Car, concurrency_key=lambda car, n: f"order/{n}")

    @order.step
    def send(step: Any, car: Car, n: int) -> None:
        step.do(paint, n)

    @app.stepped_action(concurrency_key="Car/boss")
    def boss(step: Any, car: Car) -> None:
        step.do(paint, "boss")

    @app.stepped_action(concurrency_key="Car/quick")
    def quick(car: Car) -> None:
        car.note("quick")

    return Booth(hold, paint, order, boss, quick)


@dataclass
class Written:
    statements: int = 0
    rows: int = 0


@contextmanager
def counting(stepped: Stepped) -> Iterator[Written]:
    """SQL statements and rows written (``rowcount`` of INSERT, UPDATE, DELETE)."""
    written = Written()

    def count(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        written.statements += 1
        if statement.lstrip()[:6].upper() in WRITES and cursor.rowcount > 0:
            written.rows += cursor.rowcount

    event.listen(stepped.engine, "after_cursor_execute", count)
    try:
        yield written
    finally:
        event.remove(stepped.engine, "after_cursor_execute", count)


def status(stepped: Stepped, action_id: int) -> str:
    return stepped.get_action(action_id).status


def first_step(stepped: Stepped, action_id: int) -> Step:
    return stepped.get_action(action_id).steps[0]


def waiting_links(stepped: Stepped, step_id: int) -> list[int | None]:
    with stepped.session() as s:
        query = select(ParentLink.action_id).where(
            ParentLink.step_id == step_id, ParentLink.state == "waiting"
        )
        return list(s.scalars(query.order_by(ParentLink.id)).all())


def redis_keys(stepped: Stepped) -> list[str]:
    pattern = keys.namespace_pattern(stepped.namespace)
    return sorted(k.decode() for k in stepped.redis.scan_iter(match=pattern))


def resumed(stepped: Stepped) -> list[int]:
    """The actions ``stepped.repair()`` would resume (nothing applied)."""
    report = stepped.repair(apply=False)
    return sorted(r.target for r in report.resends if r.task == "stepped.resume")


# -- the cost of a request --------------------------------------------------------------------


def test_each_request_of_a_burst_writes_the_same_rows(stepped: Stepped, car: Car) -> None:
    """Issue 12, scenario 6: the n-th request into a lane costs what the third did."""
    booth = define_booth(stepped)
    requests = 40
    costs: list[Written] = []
    with stepped.capture() as jobs:
        held = booth.hold.now(car)
        for n in range(requests):
            with counting(stepped) as written:
                booth.order.now(car, n)  # its step starts a paint in the booth lane
                jobs.perform(only="action")  # the paint joins the lane, superseding
            costs.append(written)
        paints = stored_actions(stepped, "paint")
        assert [a.status for a in paints] == ["superseded"] * (requests - 1) + ["pending"]
        # every order waits on the last paint, through the chain of superseded ones
        ends = {a.id: a.superseded_by_id for a in paints}
        assert all(ends[a.id] == paints[i + 1].id for i, a in enumerate(paints[:-1]))
        stepped.complete(held.id)
        perform_stepped_actions(stepped)

    superseding = costs[2:]  # the first request finds no pending action, the second one
    early, late = superseding[:5], superseding[-5:]
    assert max(c.rows for c in late) <= max(c.rows for c in early)
    assert max(c.statements for c in late) <= max(c.statements for c in early)
    assert {c.rows for c in superseding} == {superseding[0].rows}  # the same every time
    assert [a.status for a in stored_actions(stepped, "order")] == ["succeeded"] * requests
    for order in stored_actions(stepped, "order"):
        step = first_step(stepped, order.id)
        assert (step.pending_actions_count, step.unsuccessful_actions_count) == (0, 0)
    assert load_car(stepped, car.id).honks == 1
    assert redis_keys(stepped) == []


# -- a superseder final before the actions superseded into it ------------------------------------


def test_a_superseder_already_final_reports_to_the_parents_it_inherits(
    stepped: Stepped, car: Car
) -> None:
    """A racing join (or repair) supersedes into an action that completed meanwhile: its
    report runs again, reaches the links of the chain now behind it, each counted once."""
    booth = define_booth(stepped)
    with stepped.capture() as jobs:
        held = booth.hold.now(car)
        first = booth.order.now(car, 1)
        jobs.perform_all()
        second = booth.order.now(car, 2)
        jobs.perform_all()  # its paint supersedes the first one
        older, newer = stored_actions(stepped, "paint")
        assert (older.status, newer.status) == ("superseded", "pending")
        done = booth.quick.now(car)
        assert done.status == "succeeded"

        effects = stepped.core.entry.supersede([newer.id], done.id)
        assert effects.finished == [done.id]
        stepped.core.drive(effects)
        jobs.perform_all()
        assert status(stepped, first.id) == "succeeded"
        assert status(stepped, second.id) == "succeeded"
        stepped.core.drive(Effects(finished=[done.id]))  # reported once more: nothing counts
        for parent in (first, second):
            step = first_step(stepped, parent.id)
            assert (step.pending_actions_count, step.unsuccessful_actions_count) == (0, 0)
            assert waiting_links(stepped, step.id) == []

        stepped.complete(held.id)  # the superseded paint reaches the front: released
        perform_stepped_actions(stepped)

    assert status(stepped, newer.id) == "superseded"
    assert load_car(stepped, car.id).honks == 0
    assert redis_keys(stepped) == []


# -- deadlock through a chain of superseded actions ------------------------------------------


def test_a_deadlock_through_a_superseded_chain_is_detected(stepped: Stepped, car: Car) -> None:
    """``boss`` waits on a paint only through an action superseded into the last one:
    the ``polish`` that paint starts in the boss's lane would wait for ever."""
    booth = define_booth(stepped)
    with stepped.capture() as jobs, handle_stepped_action_exceptions(stepped):
        held = booth.hold.now(car)
        boss = booth.boss.now(car)  # performs, holds Car/boss, its paint waits (pending)
        jobs.perform_all()
        middle = booth.paint.now(car, "middle")  # supersedes the boss's paint: copy link
        last = booth.paint.now(car, "polish")  # supersedes middle; the copy stays on it
        step = first_step(stepped, boss.id)
        assert waiting_links(stepped, step.id) == [middle.id]
        assert stepped.get_action(middle.id).superseded_by_id == last.id

        stepped.complete(held.id)  # last performs; its polish joins Car/boss
        perform_stepped_actions(stepped)

    (polished,) = stored_actions(stepped, "polish")
    assert polished.status == "deadlocked"
    assert status(stepped, last.id) == "failed"
    assert status(stepped, boss.id) == "failed"  # the chain's outcome reached it
    assert load_car(stepped, car.id).log == "hold;"
    assert redis_keys(stepped) == []


# -- repair -------------------------------------------------------------------------------


def test_repair_leaves_open_chains_alone_and_resumes_a_final_end(
    stepped: Stepped, car: Car
) -> None:
    """Links waiting on superseded actions are in order while the end of their chain is
    open; once it is final and they still wait, repair resumes the end (it reports)."""
    booth = define_booth(stepped)
    with stepped.capture() as jobs:
        held = booth.hold.now(car)
        orders = [booth.order.now(car, n) for n in range(3)]
        jobs.perform_all()
        *older, last = stored_actions(stepped, "paint")
        assert [a.status for a in older] == ["superseded", "superseded"]
        assert resumed(stepped) == []

        with stepped.session() as s:  # the end's report was lost (say, an old release)
            s.execute(update(Action).where(Action.id == last.id).values(status="succeeded"))
            s.commit()
        assert resumed(stepped) == [last.id]
        stepped.repair(apply=True)
        perform_stepped_actions(stepped)
        assert resumed(stepped) == []
        assert [status(stepped, o.id) for o in orders] == ["succeeded"] * 3
        stepped.complete(held.id)
        perform_stepped_actions(stepped)


# -- views ----------------------------------------------------------------------------------


def test_a_superseder_shows_the_parents_it_inherited(stepped: Stepped, car: Car) -> None:
    """The tree of a parent shows the child it started and its superseder; the Flask
    page lists every parent of a superseder, those of its whole chain included."""
    booth = define_booth(stepped)
    with stepped.capture() as jobs:
        booth.hold.now(car)
        orders = [booth.order.now(car, n).id for n in range(3)]
        jobs.perform_all()
        first, middle, last = stored_actions(stepped, "paint")
        assert parents_of(stepped, [first.id, middle.id, last.id]) == {
            first.id: {orders[0]},
            middle.id: {orders[0], orders[1]},
            last.id: set(orders),
        }
        members = action_tree(stepped, orders[0])["steps"][0]["members"]
        assert [(m["action"]["id"], m["state"]) for m in members] == [
            (first.id, "transferred"),
            (middle.id, "waiting"),
        ]
        assert members[1]["action"]["superseded_by"] == last.id
