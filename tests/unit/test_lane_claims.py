"""A step claims its children's lanes (issue 12, ``LaneEntry.claim``).

A step that wrote its children's rows (``child_rows``) makes each child whose lane has
no current action that lane's current action, for all its children in one round trip
after its commit and before their starts are sent; such a start (marked ``entered``)
performs its child without joining the lane. These tests pin what that must keep: a
child whose lane another action holds still joins on its own, the start the outbox
stages (without the mark) still works, and a claim on a lane Redis lost while another
action performs in it gives the lane back to that action.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from celery_stepped import Step, Stepped
from celery_stepped.lanes import Lane
from celery_stepped.testing import perform_stepped_actions
from tests.conftest import load_car, make_car, stored_actions
from tests.models import Car
from tests.unit.test_lane_recovery import lose_lane


def define(stepped: Stepped) -> tuple[Any, Any]:
    """``parent(*lanes)``: one step starting ``leaf(lane)`` for each lane named; and
    ``hold(lane)``, an outbound action that holds lane ``lane`` until completed."""
    app = stepped.app

    @app.stepped_action(actor=Car, concurrency_key=lambda c, lane: ["leaf", lane])
    def leaf(c: Car, lane: str) -> None:
        c.note(lane)

    @app.stepped_action(actor=Car)
    def parent(step: Step, c: Car, *lanes: str) -> None:
        for lane in lanes:
            step.do(leaf, lane)

    @app.stepped_action(actor=Car, outbound=True, concurrency_key=lambda c, lane: ["leaf", lane])
    def hold(c: Car, lane: str) -> None:
        pass

    return parent, hold


def joins(stepped: Stepped, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ids of the actions that call the lane join script from here on (a spy: the
    script still runs on the real Redis)."""
    joined: list[int] = []
    join = stepped.lanes.join

    def spy(key: str, action_id: int, *args: Any, **kwargs: Any) -> Any:
        joined.append(action_id)
        return join(key, action_id, *args, **kwargs)

    monkeypatch.setattr(stepped.lanes, "join", spy)
    return joined


def test_a_step_claims_its_childrens_free_lanes_in_one_round_trip(
    stepped: Stepped, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent, hold = define(stepped)
    car = make_car(stepped)
    holder = hold.now(car, "busy")  # holds lane leaf/busy
    claims: list[list[tuple[str, int]]] = []
    claim = stepped.lanes.claim
    monkeypatch.setattr(stepped.lanes, "claim", lambda e: claims.append(e) or claim(e))
    with stepped.capture() as jobs:
        parent.now(car, "a", "b", "busy")
        a, b, busy = stored_actions(stepped, "leaf")
        assert claims == [[("leaf/a", a.id), ("leaf/b", b.id), ("leaf/busy", busy.id)]]
        assert stepped.lanes.get("leaf/a") == Lane("leaf/a", a.id, [])
        assert stepped.lanes.get("leaf/b") == Lane("leaf/b", b.id, [])
        assert stepped.lanes.get("leaf/busy") == Lane("leaf/busy", holder.id, [])
        starts = {m.args[0]["action"]: m.args[0] for m in jobs.take("action")}
        assert [starts[i].get("entered") for i in (a.id, b.id, busy.id)] == [True, True, None]
        joined = joins(stepped, monkeypatch)
        for payload in starts.values():
            stepped.core.start(payload)
        assert set(joined) == {busy.id}  # the claimed ones performed without joining
    assert [x.status for x in stored_actions(stepped, "leaf")] == [
        "succeeded",
        "succeeded",
        "pending",  # waits in the lane hold holds
    ]
    assert stepped.lanes.get("leaf/busy") == Lane("leaf/busy", holder.id, [busy.id])
    assert stepped.lanes.get("leaf/a") is None  # released when it completed
    with stepped.capture():
        stepped.complete(holder)
        perform_stepped_actions(stepped)
    assert [x.status for x in stored_actions(stepped, "leaf")] == ["succeeded"] * 3
    assert sorted(load_car(stepped, car.id).log.split(";")) == ["", "a", "b", "busy"]


def test_the_staged_start_without_the_mark_runs_its_child_once(stepped: Stepped) -> None:
    """The outbox stages a start before the claim marks it: swept again (a crash after
    the commit) it joins the lane the child already holds, and performs it; the
    marked start that arrives after it finds the child moved on."""
    parent, _ = define(stepped)
    car = make_car(stepped)
    with stepped.capture() as jobs:
        parent.now(car, "a")
        (start,) = jobs.take("action")
        assert start.args[0]["entered"] is True
        staged = {k: v for k, v in start.args[0].items() if k != "entered"}
        stepped.core.start(staged)
        stepped.core.start(start.args[0])
    (leaf,) = stored_actions(stepped, "leaf")
    assert leaf.status == "succeeded"
    assert load_car(stepped, car.id).log == "a;"
    assert stepped.lanes.get("leaf/a") is None


def test_a_claim_on_a_lane_redis_lost_gives_it_back_to_its_performing_action(
    stepped: Stepped, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis lost lane ``leaf/a`` while ``hold`` performs in it: the step's claim finds
    it empty and lets the child in. The child's start sees in SQL that ``hold``
    performs there: the lane is ``hold``'s again, and the child waits behind it."""
    parent, hold = define(stepped)
    car = make_car(stepped)
    holder = hold.now(car, "a")
    lose_lane(stepped, "leaf/a")
    with stepped.capture() as jobs, caplog.at_level(logging.WARNING, "celery_stepped"):
        parent.now(car, "a")
        (child,) = stored_actions(stepped, "leaf")
        assert stepped.lanes.get("leaf/a") == Lane("leaf/a", child.id, [])  # claimed
        (start,) = jobs.take("action")
        stepped.core.start(start.args[0])
    assert stored_actions(stepped, "leaf")[0].status == "pending"
    assert stepped.lanes.get("leaf/a") == Lane("leaf/a", holder.id, [child.id])
    assert f"while action #{holder.id} performs in it when #{child.id} was let in" in caplog.text
    with stepped.capture():
        stepped.complete(holder)
        perform_stepped_actions(stepped)
    assert stored_actions(stepped, "leaf")[0].status == "succeeded"
    assert load_car(stepped, car.id).log == "a;"
