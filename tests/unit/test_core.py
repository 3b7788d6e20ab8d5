"""The core engine: configuration, definitions, actors, steps, trees, callbacks."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult
from sqlalchemy import func, select

from celery_stepped import (
    ActionStatus,
    ConfigurationError,
    Step,
    Stepped,
    SteppedAction,
    StepStatus,
    UnknownAction,
    signals,
)
from celery_stepped.models import Achievement, Action, ParentLink
from celery_stepped.models import Step as StepRow
from celery_stepped.testing import handle_stepped_action_exceptions, perform_stepped_actions
from tests.conftest import load_car, make_car, stored_actions
from tests.models import Car, SportsCar


def count_rows(stepped: Stepped, model: type = Action) -> int:
    with stepped.session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def define_basics(app: Celery) -> dict[str, SteppedAction[Any]]:
    @app.stepped_action
    def drive(car: Car, miles: int) -> None:
        car.mileage += miles

    honk = app.stepped_action("honk", actor=Car)
    return {"drive": drive, "honk": honk}


# -- configuration --


def test_missing_database_names_the_setting(redis_base: str) -> None:
    app = Celery("cfg", set_as_current=False)
    with pytest.raises(ConfigurationError, match="stepped_database_url"):
        Stepped(app, redis_url=f"{redis_base}/1")


def test_missing_redis_names_the_setting(tmp_path: Any) -> None:
    app = Celery("cfg", set_as_current=False)
    with pytest.raises(ConfigurationError, match="stepped_redis_url"):
        Stepped(app, database_url=f"sqlite:///{tmp_path}/x.db")


def test_settings_come_from_app_conf(redis_base: str, tmp_path: Any) -> None:
    app = Celery("cfg", set_as_current=False)
    app.conf.stepped_database_url = f"sqlite:///{tmp_path}/conf.db"
    app.conf.stepped_redis_url = f"{redis_base}/1"
    app.conf.stepped_queue = "flows"
    app.conf.stepped_handle_exceptions = (ValueError,)
    stepped = Stepped(app)
    assert app.stepped is stepped
    assert app.stepped_action == stepped.action
    assert stepped.queue == "flows"
    assert stepped.handle_exceptions == (ValueError,)
    assert stepped.redis.ping()
    assert stepped.engine.url.database.endswith("conf.db")
    assert {"stepped.start", "stepped.advance", "stepped.wait", "stepped.timeout"} <= set(
        app.tasks.keys()
    )
    stepped.engine.dispose()


def test_internal_tasks_are_late_acked_json(stepped: Stepped) -> None:
    for name in ("stepped.start", "stepped.resume", "stepped.advance", "stepped.complete"):
        task = stepped.app.tasks[name]
        assert task.acks_late is True
        assert task.serializer == "json"


def test_session_commits_and_rolls_back(stepped: Stepped, car: Car) -> None:
    with stepped.session() as session:
        session.get_one(Car, car.id).mileage = 7
    with pytest.raises(RuntimeError), stepped.session() as session:
        session.get_one(Car, car.id).mileage = 99
        raise RuntimeError("boom")
    assert load_car(stepped, car.id).mileage == 7


def test_clock_is_aware_utc_and_replaceable(stepped: Stepped, car: Car) -> None:
    from datetime import UTC, datetime

    assert stepped.clock().tzinfo is not None
    fixed = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    stepped.clock = lambda: fixed
    define_basics(stepped.app)
    action = stepped.registry.find(Car, "drive").now(car, 1)
    assert action.started_at == fixed
    assert action.completed_at == fixed
    assert action.created_at == fixed


def test_migrations_create_the_tables(stepped: Stepped, car: Car) -> None:
    stepped.drop_all()
    stepped.migrate()
    define_basics(stepped.app)
    action = stepped.registry.find(Car, "drive").now(car, 2)
    assert action.status == "succeeded"
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from celery_stepped.models import Base

    with stepped.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    relevant = [d for d in diff if "stepped_" in repr(d) and "alembic_version" not in repr(d)]
    assert relevant == []


# -- defining --


def test_function_form_reads_name_and_actor(stepped: Stepped, car: Car) -> None:
    drive = define_basics(stepped.app)["drive"]
    assert isinstance(drive, SteppedAction)
    assert drive.action_name == "drive"
    assert drive.actor_class is Car
    action = drive.now(car, 5)
    assert action.status == ActionStatus.SUCCEEDED
    assert (action.actor_type, action.actor_id, action.arguments) == ("Car", str(car.id), [5])
    assert action.concurrency_key == f"Car/{car.id}/drive" == action.checksum_key
    assert action.root is True
    assert load_car(stepped, car.id).mileage == 5


def test_named_form_without_steps_calls_the_actor_method(stepped: Stepped, car: Car) -> None:
    honk = define_basics(stepped.app)["honk"]
    action = honk.now(car)
    assert action.status == "succeeded"
    assert load_car(stepped, car.id).honks == 1


def test_named_form_with_steps_and_succeeded_callback(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    app.stepped_action("change_location", actor=Car)
    Car.change_location = lambda self, where: setattr(self, "location", where)  # type: ignore[attr-defined]
    visit = app.stepped_action("visit", actor=Car, timeout=60)

    @visit.step
    def go(step: Step, car: Car, location: str) -> None:
        step.do("change_location", location)

    @visit.succeeded
    def stamp(action: Action, car: Car, location: str) -> None:
        car.note(f"visited {location}")

    try:
        with stepped.capture():
            action = visit.now(car, "London")
            assert action.timeout_seconds == 60
            perform_stepped_actions(stepped)
    finally:
        del Car.change_location  # type: ignore[attr-defined]
    stored = load_car(stepped, car.id)
    assert stored.location == "London"
    assert stored.log == "visited London;"
    done = stepped.get_action(action.id)
    assert done.status == "succeeded"
    assert done.after_callbacks_succeeded_count == 1


def test_function_form_may_take_the_step(stepped: Stepped, car: Car) -> None:
    honk = define_basics(stepped.app)["honk"]

    @stepped.app.stepped_action
    def double_honk(step: Step, car: Car) -> None:
        step.do(honk)
        step.do(honk)

    assert double_honk.actor_class is Car
    with stepped.capture():
        action = double_honk.now(car)
        perform_stepped_actions(stepped)
    assert stepped.get_action(action.id).status == "succeeded"
    assert load_car(stepped, car.id).honks == 2


def test_definitions_follow_the_mro_and_can_be_replaced(stepped: Stepped) -> None:
    app = stepped.app
    sports = make_car(stepped, SportsCar)
    plain = make_car(stepped)

    @app.stepped_action
    def polish(car: Car) -> None:
        car.note("plain polish")

    assert polish.now(sports).status == "succeeded"
    assert load_car(stepped, sports.id).log == "plain polish;"

    @app.stepped_action
    def polish(car: SportsCar) -> None:
        car.note("sports polish")

    polish.now(sports)
    polish.now(plain)
    assert load_car(stepped, sports.id).log == "plain polish;sports polish;"
    assert load_car(stepped, plain.id).log == "plain polish;"

    @app.stepped_action
    def polish(car: Car) -> None:
        car.note("new polish")

    polish.now(plain)
    assert load_car(stepped, plain.id).log == "plain polish;new polish;"


def test_for_actor_extends_only_the_subclass(stepped: Stepped) -> None:
    app = stepped.app
    sports = make_car(stepped, SportsCar)
    plain = make_car(stepped)
    wash = app.stepped_action("wash", actor=Car)

    @wash.step
    def rinse(step: Step, car: Car) -> None:
        car.note("rinse")

    sports_wash = wash.for_actor(SportsCar)

    @sports_wash.prepend_step
    def wax(step: Step, car: Car) -> None:
        car.note("wax")

    @sports_wash.succeeded
    def shine(action: Action, car: Car) -> None:
        car.note("shine")

    wash.now(sports)
    wash.now(plain)
    assert load_car(stepped, sports.id).log == "wax;rinse;shine;"
    assert load_car(stepped, plain.id).log == "rinse;"
    assert wash.for_actor(SportsCar) is sports_wash


def test_after_rejects_unknown_statuses(stepped: Stepped) -> None:
    honk = define_basics(stepped.app)["honk"]
    with pytest.raises(ValueError, match="superseded"):
        honk.after("superseded")

    @honk.after
    def everything(action: Action, car: Car) -> None:
        pass

    @honk.after("failed", "cancelled")
    def bad_ends(action: Action, car: Car) -> None:
        pass

    assert honk.after_callbacks("succeeded") == [everything]
    assert honk.after_callbacks("failed") == [everything, bad_ends]
    assert honk.after_callbacks("timed_out") == [everything]


# -- actors and arguments --


class Robot:
    registry: dict[str, Robot] = {}

    def __init__(self, name: str) -> None:
        self.name = name
        self.beeps = 0
        Robot.registry[name] = self


def test_registered_actors_and_references_inside_arguments(stepped: Stepped, car: Car) -> None:
    stepped.register_actor(Robot, identify=lambda r: r.name, load=Robot.registry.__getitem__)
    robot = Robot("r2")
    seen: list[Any] = []

    @stepped.app.stepped_action
    def beep(robot: Robot, payload: dict[str, Any]) -> None:
        robot.beeps += 1
        seen.append(payload)

    action = beep.now(robot, {"cars": [car], "n": 1})
    assert action.actor_type == "Robot" and action.actor_id == "r2"
    assert action.arguments == [{"cars": [{"__stepped_actor__": ["Car", str(car.id)]}], "n": 1}]
    assert robot.beeps == 1
    loaded = seen[0]["cars"][0]
    assert isinstance(loaded, Car) and loaded.id == car.id


def test_non_json_arguments_raise_before_anything_is_written(stepped: Stepped, car: Car) -> None:
    drive = define_basics(stepped.app)["drive"]
    with stepped.capture() as jobs:
        for bad in (object(), {1: "x"}, {"x": {1, 2}}, float("nan")):
            with pytest.raises(TypeError):
                drive.later(car, bad)
            with pytest.raises(TypeError):
                drive.now(car, bad)
        assert jobs.enqueued == []
    assert count_rows(stepped) == 0


def test_unknown_action_names_raise(stepped: Stepped, car: Car) -> None:
    define_basics(stepped.app)
    park = stepped.app.stepped_action("park", actor=Car)

    @park.step
    def go(step: Step, car: Car) -> None:
        step.do("fly")

    with pytest.raises(UnknownAction):
        stepped.client.start_now("fly", car, [])
    errors: list[Any] = []

    def on_handled(sender: Any, **kw: Any) -> None:
        errors.append(kw["exception"])

    signals.exception_handled.connect(on_handled)
    try:
        action = park.now(car)
    finally:
        signals.exception_handled.disconnect(on_handled)
    assert action.status == "failed"
    assert isinstance(errors[0], UnknownAction)
    with handle_stepped_action_exceptions(stepped, only=(KeyError,)), pytest.raises(UnknownAction):
        park.now(car)


def test_action_actor_loads_the_actor(stepped: Stepped, car: Car) -> None:
    drive = define_basics(stepped.app)["drive"]
    action = drive.now(car, 3)
    assert action.completed
    assert action.actor.id == car.id
    assert action.actor.mileage == 3


# -- running --


def test_later_returns_async_result_and_signature_later(stepped: Stepped, car: Car) -> None:
    drive = define_basics(stepped.app)["drive"]
    with stepped.capture() as jobs:
        result = drive.later(car, 4)
        assert isinstance(result, AsyncResult)
        drive.s(car, 6).later()
        assert [(j.kind, j.name, j.args) for j in jobs.enqueued] == [
            ("action", "drive", [4]),
            ("action", "drive", [6]),
        ]
        assert count_rows(stepped) == 0
        assert jobs.perform() == 2
    assert load_car(stepped, car.id).mileage == 10
    assert [a.status for a in stored_actions(stepped)] == ["succeeded", "succeeded"]


def test_now_returns_detached_action_with_steps(stepped: Stepped, car: Car) -> None:
    define_basics(stepped.app)
    trip = stepped.app.stepped_action("trip", actor=Car)

    @trip.step
    def one(step: Step, car: Car) -> None:
        car.note("one")

    @trip.step
    def two(step: Step, car: Car) -> None:
        step.do("honk")

    with stepped.capture():
        action = trip.now(car)
    assert action.status == "performing"
    assert [(s.definition_index, s.status) for s in action.steps] == [
        (0, "succeeded"),
        (1, "performing"),
    ]
    assert action.steps[1].pending_actions_count == 1
    # The step wrote its child's pending row; the child's own job has not run yet.
    assert [(a.name, a.status) for a in action.steps[1].actions] == [("honk", "pending")]
    assert action.current_step_index == 1


def test_before_changes_arguments_seen_by_checksum_and_steps(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    define_basics(app)
    multiplied = app.stepped_action("multiplied_drive", actor=Car)

    @multiplied.before
    def double(action: Action, car: Car, distance: int) -> None:
        action.arguments = [distance * 2]

    @multiplied.checksum
    def by_distance(car: Car, distance: int) -> Any:
        return {"distance": distance}

    @multiplied.step
    def go(step: Step, car: Car, distance: int) -> None:
        car.mileage += distance

    action = multiplied.now(car, 5)
    assert action.arguments == [10]
    canonical = json.dumps({"distance": 10}, sort_keys=True, separators=(",", ":"))
    assert action.checksum == hashlib.sha256(canonical.encode()).hexdigest()
    assert load_car(stepped, car.id).mileage == 10


@pytest.mark.parametrize("how", ["cancel", "complete"])
def test_before_short_circuit_writes_no_rows(stepped: Stepped, car: Car, how: str) -> None:
    app = stepped.app
    guarded = app.stepped_action("guarded", actor=Car)

    @guarded.before
    def stop(action: Action, car: Car) -> None:
        car.note("before ran")
        getattr(action, how)()

    @guarded.step
    def never(step: Step, car: Car) -> None:
        car.note("step ran")

    with stepped.capture() as jobs:
        action = guarded.now(car)
        assert jobs.enqueued == []
    assert action.id is None
    assert action.status == ("cancelled" if how == "cancel" else "succeeded")
    assert action.completed
    assert count_rows(stepped) == 0 and count_rows(stepped, StepRow) == 0
    assert load_car(stepped, car.id).log == "before ran;"


def test_before_handled_exception_fails_without_rows(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    guarded = app.stepped_action("guarded", actor=Car)

    @guarded.before
    def explode(action: Action, car: Car) -> None:
        car.note("rolled back")
        raise ValueError("no")

    action = guarded.now(car)
    assert action.status == "failed" and action.id is None
    assert count_rows(stepped) == 0
    assert load_car(stepped, car.id).log == ""
    with handle_stepped_action_exceptions(stepped, only=(KeyError,)), pytest.raises(ValueError):
        guarded.now(car)


def test_step_changes_commit_with_step_and_roll_back_on_error(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    risky = app.stepped_action("risky", actor=Car)

    @risky.step
    def first(step: Step, car: Car, fail: bool) -> None:
        car.note("first")

    @risky.step
    def second(step: Step, car: Car, fail: bool) -> None:
        car.note("second")
        step.session.add(Car(log="made in step"))
        if fail:
            raise RuntimeError("second failed")

    @risky.step
    def third(step: Step, car: Car, fail: bool) -> None:
        car.note("third")

    ok = risky.now(car, False)
    assert ok.status == "succeeded"
    assert load_car(stepped, car.id).log == "first;second;third;"

    other = make_car(stepped)
    failed = risky.now(other, True)
    assert failed.status == "failed"
    assert [(s.definition_index, s.status) for s in failed.steps] == [
        (0, "succeeded"),
        (1, "failed"),
    ]
    assert load_car(stepped, other.id).log == "first;"
    with stepped.session() as session:
        made = session.scalar(select(func.count()).where(Car.log == "made in step"))
    assert made == 1  # only the successful run's row

    third_car = make_car(stepped)
    with handle_stepped_action_exceptions(stepped, only=(KeyError,)), pytest.raises(RuntimeError):
        risky.now(third_car, True)
    assert load_car(stepped, third_car.id).log == "first;"


def test_step_status_failed_fails_the_action(stepped: Stepped, car: Car) -> None:
    define_basics(stepped.app)
    picky = stepped.app.stepped_action("picky", actor=Car)

    @picky.step
    def refuse(step: Step, car: Car) -> None:
        step.do("honk")
        car.note("kept")
        step.status = "failed"

    @picky.step
    def never(step: Step, car: Car) -> None:
        car.note("never")

    with stepped.capture() as jobs:
        action = picky.now(car)
        # As in Stepped, the children the body asked for still run (test_semantics.py).
        assert [(j.kind, j.name) for j in jobs.enqueued] == [("action", "honk")]
        assert action.status == "performing"
        perform_stepped_actions(stepped)
    action = stepped.get_action(action.id)
    assert action.status == "failed"
    assert [s.status for s in action.steps] == ["failed"]
    assert load_car(stepped, car.id).log == "kept;"
    assert load_car(stepped, car.id).honks == 1


def test_fan_out_on_list_with_none(stepped: Stepped) -> None:
    app = stepped.app
    drive = define_basics(app)["drive"]
    a, b = make_car(stepped), make_car(stepped)
    convoy = app.stepped_action("convoy", actor=Car)

    @convoy.step
    def go(step: Step, car: Car, other_id: int, miles: int) -> None:
        other = step.session.get(Car, other_id)
        step.on([car, None, other], drive, miles)
        step.wait(0)

    with stepped.capture() as jobs:
        action = convoy.now(a, b.id, 4)
        assert sorted(j.kind for j in jobs.enqueued) == ["action", "action", "wait"]
        step = action.steps[0]
        assert step.pending_actions_count == 3
        perform_stepped_actions(stepped)
    done = stepped.get_action(action.id)
    assert done.status == "succeeded"
    assert sorted(x.actor_id for x in done.steps[0].actions) == sorted([str(a.id), str(b.id)])
    assert load_car(stepped, a.id).mileage == 4 == load_car(stepped, b.id).mileage


def build_three_levels(app: Celery, fail_leaf: int | None = None) -> SteppedAction[Any]:
    leaf = app.stepped_action("leaf", actor=Car)

    @leaf.step
    def work(step: Step, car: Car, n: int) -> None:
        if n == fail_leaf:
            step.status = "failed"
        car.mileage += 1

    middle = app.stepped_action("middle", actor=Car, concurrency_key=lambda car, n: f"m/{n}")

    @middle.step
    def spread(step: Step, car: Car, n: int) -> None:
        for i in range(3):
            step.do(leaf, n * 10 + i)

    root = app.stepped_action("root", actor=Car)

    @root.step
    def start(step: Step, car: Car) -> None:
        for n in range(2):
            step.do(middle, n)

    @root.step
    def finish(step: Step, car: Car) -> None:
        car.note("finished")

    return root


def test_leaf_concurrency_keys_are_per_argument(stepped: Stepped, car: Car) -> None:
    leaf_root = build_three_levels(stepped.app)
    leaf = stepped.registry.find(Car, "leaf")
    leaf.concurrency_key_spec = lambda car, n: ["leaf", n]
    with stepped.capture():
        action = leaf_root.now(car)
        perform_stepped_actions(stepped)
    done = stepped.get_action(action.id)
    assert done.status == "succeeded"
    stored = load_car(stepped, car.id)
    assert stored.mileage == 6 and stored.log == "finished;"
    keys = sorted(a.concurrency_key for a in stored_actions(stepped) if a.name == "leaf")
    assert keys == [f"leaf/{n}" for n in (0, 1, 10, 11, 12, 2)]


def test_failure_travels_from_grandchild_to_root(stepped: Stepped, car: Car) -> None:
    root = build_three_levels(stepped.app, fail_leaf=11)
    stepped.registry.find(Car, "leaf").concurrency_key_spec = lambda car, n: ["leaf", n]
    with stepped.capture():
        action = root.now(car)
        perform_stepped_actions(stepped)
    by_name: dict[str, list[Action]] = {}
    for row in stored_actions(stepped):
        by_name.setdefault(row.name, []).append(row)
    leaf_status = {a.arguments[0]: a.status for a in by_name["leaf"]}
    assert leaf_status[11] == "failed"
    assert sorted(v for k, v in leaf_status.items() if k != 11) == ["succeeded"] * 5
    middle_status = {a.arguments[0]: a.status for a in by_name["middle"]}
    assert middle_status == {0: "succeeded", 1: "failed"}
    done = stepped.get_action(action.id)
    assert done.status == "failed"
    assert [s.status for s in done.steps] == ["failed"]  # the second step never ran
    assert done.steps[0].unsuccessful_actions_count == 1
    assert load_car(stepped, car.id).log == ""


# -- after callbacks --


def test_after_callbacks_run_per_status_and_count(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    flaky = app.stepped_action("flaky", actor=Car)

    @flaky.step
    def go(step: Step, car: Car, ok: bool) -> None:
        if not ok:
            step.status = "failed"

    @flaky.succeeded
    def yay(action: Action, car: Car, ok: bool) -> None:
        car.note("succeeded")

    @flaky.failed
    def nay(action: Action, car: Car, ok: bool) -> None:
        car.note("failed")

    @flaky.after
    def always(action: Action, car: Car, ok: bool) -> None:
        car.note(f"after {action.status}")

    assert flaky.now(car, True).after_callbacks_succeeded_count == 2
    assert flaky.now(car, False).after_callbacks_succeeded_count == 2
    assert load_car(stepped, car.id).log == ("succeeded;after succeeded;failed;after failed;")


def test_after_callback_errors_keep_status_and_fail_parent(stepped: Stepped, car: Car) -> None:
    app = stepped.app
    child = app.stepped_action("child", actor=Car, checksum=lambda car: "same")

    @child.step
    def work(step: Step, car: Car) -> None:
        car.note("work")

    @child.succeeded
    def good(action: Action, car: Car) -> None:
        car.note("good")

    @child.succeeded
    def bad(action: Action, car: Car) -> None:
        car.note("rolled back")
        raise ValueError("callback failed")

    parent = app.stepped_action("parent", actor=Car)

    @parent.step
    def go(step: Step, car: Car) -> None:
        step.do(child)

    handled: list[dict[str, Any]] = []

    def on_handled(sender: Any, **kw: Any) -> None:
        handled.append(kw)

    signals.exception_handled.connect(on_handled)
    try:
        with stepped.capture():
            action = parent.now(car)
            perform_stepped_actions(stepped)
    finally:
        signals.exception_handled.disconnect(on_handled)
    (child_row,) = [a for a in stored_actions(stepped) if a.name == "child"]
    assert child_row.status == "succeeded"
    assert (child_row.after_callbacks_succeeded_count, child_row.after_callbacks_failed_count) == (
        1,
        1,
    )
    assert count_rows(stepped, Achievement) == 0  # a failed callback grants no achievement
    assert stepped.get_action(action.id).status == "failed"
    assert load_car(stepped, car.id).log == "work;good;"
    assert handled[0]["block"] == "after_succeeded"
    assert handled[0]["action_id"] == child_row.id

    with handle_stepped_action_exceptions(stepped, only=(KeyError,)), pytest.raises(ValueError):
        child.now(make_car(stepped))


def test_exception_handled_signal_carries_context(stepped: Stepped, car: Car) -> None:
    broken = stepped.app.stepped_action("broken", actor=Car)

    @broken.step
    def fine(step: Step, car: Car) -> None:
        pass

    @broken.step
    def boom(step: Step, car: Car) -> None:
        raise KeyError("boom")

    seen: list[dict[str, Any]] = []

    def on_handled(sender: Any, **kw: Any) -> None:
        seen.append({"sender": sender, **kw})

    signals.exception_handled.connect(on_handled)
    try:
        action = broken.now(car)
    finally:
        signals.exception_handled.disconnect(on_handled)
    assert action.status == "failed"
    (event,) = seen
    assert event["sender"] is stepped
    assert isinstance(event["exception"], KeyError)
    assert (event["action_id"], event["step_index"], event["block"]) == (action.id, 1, "step")


def test_parent_links_and_step_rows(stepped: Stepped, car: Car) -> None:
    define_basics(stepped.app)
    twice = stepped.app.stepped_action("twice", actor=Car)

    @twice.step
    def go(step: Step, car: Car) -> None:
        step.do("drive", 1)
        step.do("drive", 2)

    with stepped.capture():
        action = twice.now(car)
        perform_stepped_actions(stepped)
    done = stepped.get_action(action.id)
    children = done.steps[0].actions
    assert [c.arguments for c in children] == [[1], [2]]
    assert all(c.root is False for c in children)
    child = stepped.get_action(children[0].id)
    assert [s.id for s in child.parent_steps] == [done.steps[0].id]
    with stepped.session() as session:
        states = session.scalars(select(ParentLink.state)).all()
    assert states == ["done", "done"]
    assert done.steps[0].status == StepStatus.SUCCEEDED
    assert done.steps[0].pending_actions_count == 0
