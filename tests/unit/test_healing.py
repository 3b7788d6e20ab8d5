"""Healing (issue 15): the sweep resumes pending actions that nothing would move on.

A lane's front action whose begin message was lost, an action left in no lane after
Redis lost the lane, and one waiting behind a current action that is already final:
each is found by :meth:`celery_stepped.healing.Healing.heal` on one sweep and healed
on the next. Real Redis and SQL; the faults are injected by dropping the captured
messages (what a broker that lost its data does) and deleting the lane's keys.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kombu import Queue
from sqlalchemy import update

from celery_stepped import Stepped
from celery_stepped.effects import Effects
from celery_stepped.lanes import Lane
from celery_stepped.models import Action, ParentLink, Step
from celery_stepped.outbox import JobQueue
from celery_stepped.testing import perform_stepped_actions
from tests.conftest import make_car, stored_actions
from tests.models import Car
from tests.unit.test_lane_recovery import lose_lane
from tests.unit.test_lanes import SHOP, Crash, define_shop, redis_keys, status, succeed_outbound


def sweep_twice(stepped: Stepped) -> list[int]:
    """Two sweeps' healing, as a worker's sweep thread runs it; what the second resumed."""
    first = stepped.healing.heal(0)
    assert first.handoff == []  # a suspect is healed only when a second sweep finds it
    second = stepped.healing.heal(0)
    stepped.core.drive(second)
    return second.handoff


def paint_behind_hold(stepped: Stepped) -> tuple[Action, Action]:
    """An outbound ``hold`` performing in the shop's lane and a ``paint`` pending behind it."""
    car = make_car(stepped)
    shop = define_shop(stepped)
    held = shop.hold.now(car)
    shop.paint.now(car, 1)
    (paint,) = stored_actions(stepped, "paint")
    return held, paint


def lose_messages(jobs: JobQueue) -> None:
    """The broker loses every message it holds (Redis restarted empty)."""
    jobs.take()


def test_a_lane_front_whose_begin_message_was_lost_is_resumed(stepped: Stepped) -> None:
    with stepped.capture() as jobs:
        held, paint = paint_behind_hold(stepped)
        stepped.complete(held.id)  # promotes paint; its stepped.resume is then lost
        lose_messages(jobs)
        assert stepped.lanes.get(SHOP) == Lane(SHOP, paint.id, [])
        assert status(stepped, paint.id) == "pending"
        assert sweep_twice(stepped) == [paint.id]
        perform_stepped_actions(stepped)
    assert status(stepped, paint.id) == "succeeded"
    assert redis_keys(stepped) == []


def test_a_pending_action_redis_lost_the_lane_of_is_put_back_and_resumed(
    stepped: Stepped,
) -> None:
    car = make_car(stepped)
    shop = define_shop(stepped)
    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        shop.paint.now(car, 1)
        shop.paint.now(car, 2)  # supersedes the first paint
        first, second = stored_actions(stepped, "paint")
        lose_lane(stepped, SHOP)
        stepped.complete(held.id)  # its lane is gone: nothing is promoted
        lose_messages(jobs)
        assert stepped.lanes.get(SHOP) is None
        assert [status(stepped, a.id) for a in (first, second)] == ["superseded", "pending"]
        assert sweep_twice(stepped) == [second.id]
        perform_stepped_actions(stepped)
    assert status(stepped, second.id) == "succeeded"
    assert redis_keys(stepped) == []


def test_an_action_behind_a_final_current_action_is_promoted(stepped: Stepped) -> None:
    with stepped.capture():
        held, paint = paint_behind_hold(stepped)
        with stepped.session() as s:  # final in SQL, but its lane was never released
            s.execute(update(Action).where(Action.id == held.id).values(status="succeeded"))
        assert stepped.lanes.get(SHOP) == Lane(SHOP, held.id, [paint.id])
        assert sweep_twice(stepped) == [paint.id]
        perform_stepped_actions(stepped)
    assert status(stepped, paint.id) == "succeeded"


def test_healing_leaves_actions_that_wait_in_their_lanes_alone(stepped: Stepped) -> None:
    with stepped.capture() as jobs:
        held, paint = paint_behind_hold(stepped)
        for _ in range(3):
            stepped.core.drive(stepped.healing.heal(0))
        assert len(jobs) == 0
        assert stepped.lanes.get(SHOP) == Lane(SHOP, held.id, [paint.id])
        assert status(stepped, paint.id) == "pending"
        perform_stepped_actions(stepped, complete_outbound=succeed_outbound)
    assert [status(stepped, i) for i in (held.id, paint.id)] == ["succeeded", "succeeded"]


def test_healing_only_looks_at_actions_older_than_the_sweep_age(stepped: Stepped) -> None:
    car = make_car(stepped)
    shop = define_shop(stepped)
    with stepped.capture() as jobs:
        held = shop.hold.now(car)
        shop.paint.now(car, 1)
        stepped.complete(held.id)
        lose_messages(jobs)
        for _ in range(3):
            assert stepped.healing.heal(3600).handoff == []


# -- work a killed task left half done (faults injected by rewinding committed rows) ------


def serviced(stepped: Stepped) -> tuple[Action, Action]:
    """A ``service`` whose step started one ``paint``, both run to the end."""
    shop = define_shop(stepped)
    with stepped.capture():
        service = shop.service.now(make_car(stepped), 1)
        perform_stepped_actions(stepped)
    (paint,) = stored_actions(stepped, "paint")
    assert [status(stepped, a.id) for a in (service, paint)] == ["succeeded", "succeeded"]
    return service, paint


def heal_and_run(stepped: Stepped) -> Effects:
    """Two sweeps' healing (the first only notes suspects), then everything it led to;
    what the second sweep decided."""
    with stepped.capture():
        assert not stepped.healing.heal(0)
        second = stepped.healing.heal(0)
        stepped.core.drive(second)
        perform_stepped_actions(stepped)
    return second


def reopen(stepped: Stepped, action: Action) -> None:
    """The action's completion never committed (its task was killed before it)."""
    with stepped.session() as s:
        s.execute(
            update(Action)
            .where(Action.id == action.id)
            .values(status="performing", completed_at=None)
        )


def test_an_action_whose_current_step_closed_but_that_never_moved_on_is_resumed(
    stepped: Stepped,
) -> None:
    service, _ = serviced(stepped)
    reopen(stepped, service)  # killed after its step closed, before it completed
    with stepped.capture():
        assert sweep_twice(stepped) == [service.id]
        perform_stepped_actions(stepped)
    assert status(stepped, service.id) == "succeeded"


def test_a_step_whose_members_all_reported_but_that_never_advanced_is_advanced(
    stepped: Stepped,
) -> None:
    service, _ = serviced(stepped)
    reopen(stepped, service)
    with stepped.session() as s:  # killed after the last member counted, before the advance
        s.execute(
            update(Step)
            .where(Step.action_id == service.id)
            .values(status="performing", completed_at=None)
        )
    second = heal_and_run(stepped)
    assert len(second.ready_steps) == 1
    assert status(stepped, service.id) == "succeeded"


def test_a_final_action_whose_parents_still_wait_on_it_reports_again(stepped: Stepped) -> None:
    service, paint = serviced(stepped)
    reopen(stepped, service)
    with stepped.session() as s:  # its parent's link was never counted
        s.execute(
            update(Step)
            .where(Step.action_id == service.id)
            .values(status="performing", completed_at=None, pending_actions_count=1)
        )
        s.execute(
            update(ParentLink)
            .where(ParentLink.action_id == paint.id)
            .values(state="waiting", outcome=None)
        )
    assert heal_and_run(stepped).finished == [paint.id]
    assert status(stepped, service.id) == "succeeded"


def test_an_outbound_action_that_ran_its_steps_waits_for_its_event_untouched(
    stepped: Stepped,
) -> None:
    shop = define_shop(stepped)
    with stepped.capture() as jobs:
        held = shop.hold.now(make_car(stepped))
        for _ in range(3):
            stepped.core.drive(stepped.healing.heal(0))
        assert len(jobs) == 0
    assert status(stepped, held.id) == "performing"


# -- member messages that never arrived ----------------------------------------------------


def define_waiter(stepped: Stepped, seconds: float, before: bool = False) -> Any:
    """``errand``: one step that starts a ``paint`` and waits ``seconds`` (``before``: a
    ``paint`` with a ``before`` hook, which its own start creates)."""
    shop = define_shop(stepped)
    if before:
        shop.paint.before(lambda action, car, *args: None)

    @stepped.app.stepped_action(actor=Car)
    def errand(step: Any, car: Car) -> None:
        step.do(shop.paint, 1)
        step.wait(seconds)

    return errand


def test_a_child_start_and_a_wait_that_never_arrived_are_sent_again(stepped: Stepped) -> None:
    errand = define_waiter(stepped, 0.01, before=True)
    with stepped.capture() as jobs:
        action = errand.now(make_car(stepped))
        assert stored_actions(stepped, "paint") == []  # its start creates it
        lose_messages(jobs)  # the child's start and the wait, taken and lost
        time.sleep(0.05)  # the wait is overdue
        assert not stepped.healing.heal(0)  # the first sweep only notes them
        second = stepped.healing.heal(0)
        assert sorted(m.kind for m in second.messages) == ["action", "wait"]
        stepped.core.drive(second)
        perform_stepped_actions(stepped)
    assert status(stepped, action.id) == "succeeded"
    assert [a.status for a in stored_actions(stepped, "paint")] == ["succeeded"]


def test_a_child_its_parent_wrote_whose_start_never_arrived_enters_its_lane(
    stepped: Stepped,
) -> None:
    errand = define_waiter(stepped, 0.01)
    with stepped.capture() as jobs:
        action = errand.now(make_car(stepped))
        (paint,) = stored_actions(stepped, "paint")  # written with the step, pending
        assert paint.status == "pending" and stepped.lanes.get(SHOP) is None
        lose_messages(jobs)  # the child's start and the wait, taken and lost
        time.sleep(0.05)
        assert not stepped.healing.heal(0)  # the first sweep only notes them
        second = stepped.healing.heal(0)
        assert [m.kind for m in second.messages] == ["wait"]  # its link is claimed
        assert second.handoff == [paint.id]  # its lane rebuilt from SQL, it resumes
        stepped.core.drive(second)
        perform_stepped_actions(stepped)
    assert status(stepped, action.id) == "succeeded"
    assert [a.status for a in stored_actions(stepped, "paint")] == ["succeeded"]


def test_a_wait_not_due_yet_and_a_claimed_child_are_not_sent_again(stepped: Stepped) -> None:
    errand = define_waiter(stepped, 3600)
    with stepped.capture() as jobs:
        action = errand.now(make_car(stepped))
        jobs.perform(only="action")  # the child starts (claims its link); the wait is held
        for _ in range(3):
            assert stepped.healing.heal(0).messages == []
    assert status(stepped, action.id) == "performing"


@pytest.mark.parametrize("before", [False, True], ids=["written-by-parent", "own-start"])
def test_members_behind_a_backlog_are_late_not_lost(stepped: Stepped, before: bool) -> None:
    errand = define_waiter(stepped, 0.01, before)
    with stepped.capture() as jobs:
        action = errand.now(make_car(stepped))
        lose_messages(jobs)
        time.sleep(0.05)
        held: list[str | None] = []
        stepped.healing.waiting = lambda queue: held.append(queue) or 7  # a backlog
        for _ in range(3):
            assert not stepped.healing.heal(0)  # no message, no lane rebuilt
        assert held and set(held) == {None}  # the Stepped queue was asked
        stepped.healing.waiting = lambda queue: 0  # drained: now they are lost
        stepped.core.drive(stepped.healing.heal(0))
        if before:  # a pending child in no lane is a suspect from the first idle sweep on
            assert stored_actions(stepped, "paint") == []
        else:
            assert [a.status for a in stored_actions(stepped, "paint")] == ["pending"]
            stepped.core.drive(stepped.healing.heal(0))
        perform_stepped_actions(stepped)
    assert status(stepped, action.id) == "succeeded"
    assert [a.status for a in stored_actions(stepped, "paint")] == ["succeeded"]


def test_the_broker_says_how_many_messages_a_queue_holds(stepped: Stepped) -> None:
    queue = f"healing-backlog-{time.monotonic_ns()}"
    assert stepped.outboxes.waiting(queue) == 0  # no such queue yet
    with stepped.app.connection_for_write() as connection:
        producer = connection.Producer()
        for n in range(3):
            producer.publish({"n": n}, routing_key=queue, declare=[Queue(queue)])
    assert stepped.outboxes.waiting(queue) == 3
    with stepped.app.connection_for_write() as connection:
        Queue(queue, channel=connection.default_channel).purge()
        Queue(queue, channel=connection.default_channel).delete()
    with stepped.capture():
        assert stepped.outboxes.waiting(queue) == 0  # messages stay in this process


def test_an_action_begun_but_killed_before_its_first_step_committed_is_resumed(
    stepped: Stepped, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = define_shop(stepped)
    performer = stepped.core.performer
    original = performer.run_first_steps

    def killed(*_: Any) -> Any:  # pending -> performing committed; then kill -9
        monkeypatch.setattr(performer, "run_first_steps", original)
        raise Crash("killed before the first step committed")

    monkeypatch.setattr(performer, "run_first_steps", killed)
    # Begun on its own, as a lane handoff begins it (a fresh action begins in its first
    # step's transaction instead: nothing to resume there, see test_fresh_begin.py).
    monkeypatch.setattr(performer, "begin_and_run", lambda *_: None)
    with stepped.capture(), pytest.raises(Crash):
        shop.paint.now(make_car(stepped), 1)
    (paint,) = stored_actions(stepped, "paint")
    assert status(stepped, paint.id) == "performing"
    with stepped.capture():
        assert sweep_twice(stepped) == [paint.id]
        perform_stepped_actions(stepped)
    assert status(stepped, paint.id) == "succeeded"
    assert redis_keys(stepped) == []


def test_an_action_whose_first_step_is_written_is_not_resumed(stepped: Stepped) -> None:
    errand = define_waiter(stepped, 3600)
    with stepped.capture() as jobs:
        action = errand.now(make_car(stepped))
        jobs.perform(only="action")
        for _ in range(3):
            assert action.id not in stepped.healing.heal(0).handoff
