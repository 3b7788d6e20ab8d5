"""The read model (``celery_stepped.views``) and its text (``celery_stepped.rendering``).

Trees of failed and superseded actions, step numbers, and the paginated index of root
actions, against a real database and Redis.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery.bin.base import CLIContext
from click.testing import CliRunner

from celery_stepped import ActionStatus, Stepped
from celery_stepped.cli import stepped as stepped_group
from celery_stepped.rendering import error_text, tree_lines
from celery_stepped.testing import JobQueue, handle_stepped_action_exceptions
from celery_stepped.views import action_rows, action_tree, root_rows
from tests.conftest import make_car
from tests.models import Car


def cli(stepped: Stepped, *args: str) -> str:
    """The output of ``celery stepped ARGS`` (exit code 0 expected)."""
    obj = CLIContext(app=stepped.app, no_color=True, workdir=None)
    result = CliRunner().invoke(stepped_group, list(args), obj=obj, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def define_service(stepped: Stepped) -> Any:
    """``service``: an inspection that succeeds, then a repair that raises."""
    service = stepped.app.stepped_action("service", actor=Car)

    @service.step
    def inspect(step, car):
        car.note("inspected")

    @service.step
    def repair(step, car):
        raise ValueError("gearbox back-ordered")

    return service


def define_paint(stepped: Stepped) -> Any:
    """``paint``: outbound, one lane, so a second newcomer supersedes the pending one."""
    paint = stepped.app.stepped_action("paint", actor=Car, outbound=True, concurrency_key="booth")

    @paint.step
    def spray(step, car):
        car.note("sprayed")

    return paint


# -- errors and numbers in trees -------------------------------------------------------------


def test_a_failed_step_shows_its_error_in_json_and_text(
    stepped: Stepped, stepped_jobs: JobQueue, car: Car
) -> None:
    service = define_service(stepped)
    with handle_stepped_action_exceptions(stepped):
        action = service.now(car)
    assert stepped.get_action(action.id).status == ActionStatus.FAILED

    tree = json.loads(cli(stepped, "tree", str(action.id), "--json"))
    inspected, repaired = tree["steps"]
    assert (inspected["index"], inspected["number"], inspected["error"]) == (0, 1, None)
    assert (repaired["index"], repaired["number"], repaired["status"]) == (1, 2, "failed")
    error = repaired["error"]
    assert (error["type"], error["message"]) == ("ValueError", "gearbox back-ordered")
    assert "gearbox back-ordered" in error["traceback"]
    assert tree["superseded_by"] is None

    lines = cli(stepped, "tree", str(action.id)).splitlines()
    assert lines[0].startswith(f"#{action.id} service on Car/{car.id}: failed")
    assert lines[1].startswith("├─ step 1/2 inspect: succeeded in ")
    assert lines[2].startswith("└─ step 2/2 repair: failed in ")
    assert lines[3] == "   └─ ValueError: gearbox back-ordered"


def test_a_superseded_action_names_its_superseder(stepped: Stepped, stepped_jobs: JobQueue) -> None:
    paint = define_paint(stepped)
    paint.now(make_car(stepped))  # holds the lane
    old = paint.now(make_car(stepped))
    new = paint.now(make_car(stepped))

    tree = action_tree(stepped, old.id)
    assert (tree["status"], tree["superseded_by"], tree["error"]) == ("superseded", new.id, None)
    assert tree_lines(tree) == [f"#{old.id} paint on {tree['actor']}: superseded by #{new.id}"]
    assert action_tree(stepped, new.id)["superseded_by"] is None


def test_step_numbers_count_from_one_everywhere(
    stepped: Stepped, stepped_jobs: JobQueue, car: Car
) -> None:
    service = define_service(stepped)
    with handle_stepped_action_exceptions(stepped):
        failed = service.now(car)
    pending = define_paint(stepped)
    pending.now(make_car(stepped))
    waiting = pending.now(make_car(stepped))

    rows = {r["id"]: r for r in action_rows(stepped)}
    assert (rows[failed.id]["current_step_number"], rows[failed.id]["step_count"]) == (2, 2)
    assert rows[waiting.id]["current_step_number"] is None  # not started
    assert action_tree(stepped, failed.id)["current_step_number"] == 2
    table = cli(stepped, "actions", "--name", "service").splitlines()
    assert table[1].split()[3:5] == ["failed", "2/2"]


def test_error_text_keeps_the_first_line_and_cuts_long_messages() -> None:
    assert error_text(None) == ""
    assert error_text({"type": "KeyError", "message": ""}) == "KeyError"
    assert error_text({"type": "E", "message": "one\ntwo"}) == "E: one"
    long = error_text({"type": "E", "message": "x" * 500}, width=20)
    assert len(long) == 20 and long.endswith("…")


# -- root_rows ---------------------------------------------------------------------------


def make_roots(stepped: Stepped) -> dict[str, list[int]]:
    """Seven roots: 3 failed services; paints: 1 performing, 1 pending, 2 superseded."""
    service, paint = define_service(stepped), define_paint(stepped)
    cars = [make_car(stepped) for _ in range(3)]
    ids: dict[str, list[int]] = {"service": [], "paint": []}
    with handle_stepped_action_exceptions(stepped):
        for car in cars:
            ids["service"].append(service.now(car).id)
    for car in [cars[0], cars[1], cars[2], cars[0]]:
        ids["paint"].append(paint.now(car).id)
    return ids


def test_root_rows_pages_newest_first_with_counts(stepped: Stepped, stepped_jobs: JobQueue) -> None:
    ids = make_roots(stepped)
    newest_first = sorted(ids["service"] + ids["paint"], reverse=True)

    first = root_rows(stepped, per_page=3)
    assert (first["total"], first["page"], first["per_page"], first["pages"]) == (7, 1, 3, 3)
    assert [r["id"] for r in first["items"]] == newest_first[:3]
    third = root_rows(stepped, page=3, per_page=3)
    assert [r["id"] for r in third["items"]] == newest_first[6:]
    assert root_rows(stepped, page=4, per_page=3)["items"] == []
    assert first["counts"] == {
        **{s.value: 0 for s in ActionStatus},
        "failed": 3,
        "performing": 1,
        "pending": 1,
        "superseded": 2,
    }
    assert set(first["items"][0]) >= {"id", "name", "actor", "status", "current_step_number"}


def test_root_rows_filter_by_status_name_and_actor(
    stepped: Stepped, stepped_jobs: JobQueue
) -> None:
    ids = make_roots(stepped)
    failed = root_rows(stepped, status="failed")
    assert [r["id"] for r in failed["items"]] == sorted(ids["service"], reverse=True)
    assert failed["total"] == 3 and failed["counts"]["superseded"] == 2  # counts ignore status
    paints = root_rows(stepped, name="paint")
    assert paints["total"] == 4 and paints["counts"]["failed"] == 0
    first_car = root_rows(stepped, actor=paints["items"][0]["actor"])
    assert [r["name"] for r in first_car["items"]] == ["paint", "paint", "service"]
    assert root_rows(stepped, actor="Car")["total"] == 7
    assert root_rows(stepped, actor="Truck")["total"] == 0
    empty = root_rows(stepped, name="nothing")
    assert (empty["items"], empty["total"], empty["pages"]) == ([], 0, 1)


def test_root_rows_leave_out_children(stepped: Stepped, stepped_jobs: JobQueue, car: Car) -> None:
    @stepped.app.stepped_action
    def drive(car: Car) -> None:
        car.note("drove")

    trip = stepped.app.stepped_action("trip", actor=Car)

    @trip.step
    def go(step, car):
        step.do(drive)

    root = trip.now(car)
    page = root_rows(stepped)
    assert [r["id"] for r in page["items"]] == [root.id]
    assert sum(page["counts"].values()) == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"status": "lost"}, "unknown status 'lost': expected one of pending, performing"),
        ({"page": 0}, "page must be 1 or more, not 0"),
        ({"actor": "Car/"}, "actor must be 'Type' or 'Type/id', not 'Car/'"),
        ({"actor": "/7"}, "actor must be 'Type' or 'Type/id', not '/7'"),
        ({"per_page": 0}, "per_page must be between 1 and 500, not 0"),
        ({"per_page": 501}, "per_page must be between 1 and 500, not 501"),
    ],
)
def test_root_rows_reject_bad_filters(
    stepped: Stepped, arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match="^" + message):
        root_rows(stepped, **arguments)
