"""An action the same call created begins in its first step's transaction (issue 12).

A child's start, or ``now()``, that its lane lets in at once moves the action from
pending to performing in the transaction of its first step body: there is no commit
in which it performs without a step. It reuses the row it wrote and the actor its keys
read. These tests pin what that path must still do: the body sees a performing
action, failures begin it too, another delivery that began it first wins, and a
caller's own actor object is never taken into Stepped's session.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event, func, inspect, select

from celery_stepped import Step, Stepped, beginning, signals, starting
from celery_stepped.beginning import begin_row
from celery_stepped.models import Action
from celery_stepped.models import Step as StepRow
from celery_stepped.testing import handle_stepped_action_exceptions, perform_stepped_actions
from tests.conftest import load_car, stored_actions
from tests.models import Car


def steps_of(stepped: Stepped, action_id: int) -> list[str]:
    with stepped.session() as session:
        rows = session.scalars(select(StepRow.status).where(StepRow.action_id == action_id))
        return list(rows)


def test_an_action_is_never_performing_without_its_first_step(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    seen: list[tuple[str, list[str]]] = []

    @app.stepped_action(concurrency_key=lambda c: ["wash", c.id])
    def wash(c: Car) -> None:
        c.note("wash")

    def started(sender: Any = None, action_id: int = 0, **_: Any) -> None:
        seen.append((stored_status(stepped, action_id), steps_of(stepped, action_id)))

    signals.action_started.connect(started)
    try:
        with stepped.capture():
            action = wash.now(car)
    finally:
        signals.action_started.disconnect(started)
    # The signal comes after the commit that began it: its step was in that commit.
    (status, steps), *more = seen
    assert (status in ("performing", "succeeded"), steps, more) == (True, ["succeeded"], [])
    assert stepped.get_action(action.id).started_at is not None
    assert load_car(stepped, car.id).log == "wash;"


def stored_status(stepped: Stepped, action_id: int) -> str:
    return str(stepped.get_action(action_id).status)


def test_the_first_body_sees_its_action_performing(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    seen: list[Any] = []

    @app.stepped_action()
    def inspect_self(step: Step, c: Car) -> None:
        seen.append((step.action.status, step.action.started_at is not None, step.action.steps))

    with stepped.capture():
        inspect_self.now(car)
    assert seen == [("performing", True, [])]


def test_a_handled_failure_of_the_first_body_begins_the_action_and_fails_it(
    stepped: Stepped, car: Car
) -> None:
    app = stepped.app
    started: list[int] = []

    @app.stepped_action()
    def broken(c: Car) -> None:
        raise ValueError("no paint")

    def on_started(sender: Any = None, action_id: int = 0, **_: Any) -> None:
        started.append(action_id)

    signals.action_started.connect(on_started)
    try:
        with stepped.capture():
            action = broken.now(car)
            perform_stepped_actions(stepped)
    finally:
        signals.action_started.disconnect(on_started)
    stored = stepped.get_action(action.id)
    assert (stored.status, stored.started_at is not None) == ("failed", True)
    assert steps_of(stepped, action.id) == ["failed"]
    assert started == [action.id]


def test_an_unhandled_error_in_the_first_body_leaves_it_performing_as_before(
    stepped: Stepped, car: Car
) -> None:
    app = stepped.app

    @app.stepped_action(timeout=60)
    def broken(c: Car) -> None:
        raise RuntimeError("a bug")

    with stepped.capture() as jobs:
        with (
            handle_stepped_action_exceptions(stepped, only=(KeyError,)),
            pytest.raises(RuntimeError),
        ):
            broken.now(car)
        assert jobs.enqueued == []
    (action,) = stored_actions(stepped, "broken")
    # As when it began on its own: performing, no step (the sweep resumes it), and its
    # timeout staged in the outbox, which the sweep sends.
    assert (action.status, steps_of(stepped, action.id)) == ("performing", [])
    with stepped.capture() as jobs:
        assert stepped.sweep_outbox(0) == 1
        assert [job.kind for job in jobs.enqueued] == ["timeout"]


def test_another_delivery_that_began_it_first_runs_it_once(
    stepped: Stepped, car: Car, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = stepped.app
    runs: list[int] = []

    @app.stepped_action()
    def wash(c: Car) -> None:
        runs.append(c.id)  # no write: a write would hold SQLite's lock against the race

    def raced(s: Any, action_id: int, now: Any) -> Any:
        monkeypatch.setattr(beginning, "begin_row", begin_row)
        with stepped.session() as other:  # a second delivery begins it meanwhile
            assert begin_row(other, action_id, now) is not None
            other.commit()
        return begin_row(s, action_id, now)  # not pending any more: None

    monkeypatch.setattr(beginning, "begin_row", raced)
    with stepped.capture():
        action = wash.now(car)
        perform_stepped_actions(stepped)
    assert stepped.get_action(action.id).status == "succeeded"
    assert steps_of(stepped, action.id) == ["succeeded"]
    # PostgreSQL begins before the body (the row lock), so the body runs once; SQLite
    # after it, and its first run's step rolled back (see Performer.perform_step).
    sqlite = stepped.engine.dialect.name == "sqlite"
    assert len(runs) == (2 if sqlite else 1)


def test_a_childs_keys_run_in_its_parents_step_and_its_body_loads_the_actor(
    stepped: Stepped, car: Car
) -> None:
    app = stepped.app
    actors: dict[str, Any] = {}
    parents: list[list[int]] = []

    def key(c: Car) -> list[Any]:
        actors["keys"] = c
        return ["leaf", c.id]

    @app.stepped_action(actor=Car, concurrency_key=key)
    def leaf(step: Step, c: Car) -> None:
        actors["body"] = c
        parents.append([parent_step.action_id for parent_step in step.action.parent_steps])
        c.note("leaf")

    @app.stepped_action(actor=Car)
    def parent(step: Step, c: Car) -> None:
        actors["parent"] = c
        step.do(leaf)

    with stepped.capture():
        root = parent.now(car)
        # The key ran with the parent's actor, when its step wrote the child's row.
        assert actors["keys"] is actors["parent"]
        (child,) = stored_actions(stepped, "leaf")
        assert (child.status, child.concurrency_key) == ("pending", f"leaf/{car.id}")
        perform_stepped_actions(stepped)
    assert stepped.get_action(root.id).status == "succeeded"
    assert actors["body"] is not actors["keys"] and actors["body"].id == car.id
    assert parents == [[root.id]]  # the action it hands the body reads its parent steps
    assert load_car(stepped, car.id).log == "leaf;"  # the body's change was written


def test_the_callers_actor_stays_in_the_callers_session(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    bodies: list[Any] = []

    @app.stepped_action(concurrency_key=lambda c: ["wash", c.location])
    def wash(c: Car) -> None:
        bodies.append(c)
        c.note("wash")

    with stepped.session() as session:
        mine = session.get(Car, car.id)
        assert mine is not None
        with stepped.capture():
            wash.now(mine)
        assert inspect(mine).session is session
        assert bodies and bodies[0] is not mine
        count = session.scalar(select(func.count()).select_from(StepRow))
    assert count == 1
    assert load_car(stepped, car.id).log == "wash;"


def test_the_action_performing_in_a_lane_is_found_by_one_index_probe(stepped: Stepped) -> None:
    """Every start asks whether an action performs under its key (in its INSERT); with
    one index on the status, SQLite scanned every performing action to answer."""
    indexes = {
        i["name"]: i["column_names"] for i in inspect(stepped.engine).get_indexes("stepped_actions")
    }
    assert indexes["ix_stepped_actions_lane"] == ["concurrency_key", "status"]
    if stepped.engine.dialect.name != "sqlite":
        return  # PostgreSQL plans from its statistics: the index is there (above)
    query = select(starting._LANE_OTHER.c.id).where(
        starting._LANE_OTHER.c.concurrency_key == "lane/1",
        starting._LANE_OTHER.c.status == "performing",
    )
    sql = str(query.compile(stepped.engine, compile_kwargs={"literal_binds": True}))
    with stepped.engine.connect() as connection:
        plan = " ".join(str(row) for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
    assert "ix_stepped_actions_lane" in plan


def _status_updates(stepped: Stepped, action_id: int) -> tuple[list[str], Any]:
    """The UPDATEs of ``action_id``'s status that ``perform_stepped_actions`` sends, and
    a callable that stops recording them."""
    seen: list[str] = []

    def record(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
        values = params.values() if isinstance(params, dict) else params
        text = " ".join(statement.split())
        if text.startswith("UPDATE stepped_actions SET status") and action_id in list(values):
            seen.append(text)

    event.listen(stepped.engine, "before_cursor_execute", record)
    return seen, lambda: event.remove(stepped.engine, "before_cursor_execute", record)


def test_a_fresh_child_that_completes_at_once_begins_in_its_completion(
    stepped: Stepped, car: Car
) -> None:
    app = stepped.app
    order: list[tuple[str, int]] = []

    @app.stepped_action(actor=Car, concurrency_key=lambda c: ["leaf", c.id])
    def leaf(c: Car) -> None:
        c.note("leaf")

    @app.stepped_action(actor=Car)
    def parent(step: Step, c: Car) -> None:
        step.do(leaf)

    def started(sender: Any = None, action_id: int = 0, **_: Any) -> None:
        order.append(("started", action_id))

    def completed(sender: Any = None, action_id: int = 0, **_: Any) -> None:
        order.append(("completed", action_id))

    signals.action_started.connect(started)
    signals.action_completed.connect(completed)
    try:
        with stepped.capture():
            root = parent.now(car)
            next_id = root.id + 1  # the child's row is the next one written
            updates, stop = _status_updates(stepped, next_id)
            perform_stepped_actions(stepped)
            stop()
    finally:
        signals.action_started.disconnect(started)
        signals.action_completed.disconnect(completed)
    (child,) = stored_actions(stepped, "leaf")
    assert child.id == next_id
    assert (child.status, load_car(stepped, car.id).log) == ("succeeded", "leaf;")
    with stepped.session() as session:
        step_started = session.scalar(
            select(StepRow.started_at).where(StepRow.action_id == child.id)
        )
    # SQLite begins it in the UPDATE that completes it, since the step it began with;
    # PostgreSQL begins it before its body (the row lock), then completes it.
    sqlite = stepped.engine.dialect.name == "sqlite"
    assert len(updates) == (1 if sqlite else 2)
    assert child.started_at is not None and child.completed_at is not None
    assert child.started_at <= child.completed_at
    assert child.started_at == step_started  # it began with its step, on both
    mine = [kind for kind, action_id in order if action_id == child.id]
    assert mine == ["started", "completed"]


def test_a_fresh_child_begun_elsewhere_before_its_completion_runs_once_more(
    stepped: Stepped, car: Car, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = stepped.app
    runs: list[int] = []

    @app.stepped_action(actor=Car, concurrency_key=lambda c: ["leaf", c.id])
    def leaf(c: Car) -> None:
        runs.append(c.id)  # no write: a write would hold SQLite's lock against the race

    @app.stepped_action(actor=Car)
    def parent(step: Step, c: Car) -> None:
        step.do(leaf)

    original = beginning.Beginner.folds
    raced: list[int] = []

    def racing(s: Any, along: Any) -> bool:
        folds = original(s, along)
        if folds and along.action.name == "leaf" and not raced:
            # After the leaf's body: a second delivery begins it meanwhile.
            raced.append(along.action.id)
            with stepped.session() as other:
                assert begin_row(other, along.action.id, along.action.created_at) is not None
                other.commit()
        return folds

    monkeypatch.setattr(beginning.Beginner, "folds", staticmethod(racing))
    with stepped.capture():
        root = parent.now(car)
        perform_stepped_actions(stepped)
    (child,) = stored_actions(stepped, "leaf")
    assert [stepped.get_action(root.id).status, child.status] == ["succeeded", "succeeded"]
    assert steps_of(stepped, child.id) == ["succeeded"]
    # The fold found it performing: its step rolled back, and the ordinary path ran the
    # body again and completed it (SQLite; PostgreSQL does not fold, and runs it once).
    sqlite = stepped.engine.dialect.name == "sqlite"
    assert len(runs) == (2 if sqlite else 1)
    assert raced == ([child.id] if sqlite else [])


def test_a_lanes_next_action_begins_in_its_first_steps_transaction(
    stepped: Stepped, car: Car
) -> None:
    app = stepped.app
    seen: list[tuple[str, list[str]]] = []

    @app.stepped_action(outbound=True, concurrency_key=lambda c: ["bay", c.id])
    def hold(c: Car) -> None:
        """Performs until completed from outside."""

    @app.stepped_action(outbound=True, concurrency_key=lambda c: ["bay", c.id])
    def wash(c: Car) -> None:
        c.note("wash")

    with stepped.capture():
        first = hold.now(car)
        second = wash.now(car)
        assert stepped.get_action(second.id).status == "pending"

        def started(sender: Any = None, action_id: int = 0, **_: Any) -> None:
            if action_id == second.id:
                seen.append((stored_status(stepped, action_id), steps_of(stepped, action_id)))

        signals.action_started.connect(started)
        try:
            stepped.complete(first.id)  # the lane hands on to the pending one
            perform_stepped_actions(stepped)
        finally:
            signals.action_started.disconnect(started)
    # Its begin and its first step were one commit: completed from outside between the
    # two, an outbound action would never run its steps.
    assert seen == [("performing", ["succeeded"])]
    assert stepped.get_action(second.id).started_at is not None
    assert load_car(stepped, car.id).log == "wash;"


def test_an_attached_row_is_an_unchanged_persistent_action(stepped: Stepped, car: Car) -> None:
    app = stepped.app

    @app.stepped_action(outbound=True)
    def hold(c: Car, where: str) -> None:
        """Performs until completed from outside."""

    with stepped.capture():
        action_id = hold.now(car, "bay").id
    with stepped.session() as session:
        stored = session.get_one(Action, action_id)
        row = {column.key: getattr(stored, column.key) for column in Action.__table__.columns}
    written: list[str] = []
    with stepped.session() as session:
        event.listen(session, "after_flush", lambda s, _: written.extend(map(repr, s.dirty)))
        action = beginning.attach_row(session, row, steps=[])
        state = inspect(action)
        assert (state.persistent, state.modified, len(session.dirty)) == (True, False, 0)
        assert [action.id, action.arguments, action.status, action.steps] == [
            action_id,
            stored.arguments,
            "performing",
            [],
        ]
        session.flush()
        assert written == []
