"""``celery -A app stepped ...``: every subcommand against a real database and Redis.

Most tests invoke the click group in-process with the context object Celery's own CLI
builds (``CLIContext``); one runs ``python -m celery ... stepped`` as a subprocess to
check the ``celery.commands`` entry point end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from celery.bin.base import CLIContext
from click.testing import CliRunner, Result
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text

from celery_stepped import ActionStatus, Stepped
from celery_stepped.cli import stepped as stepped_group
from celery_stepped.testing import JobQueue, perform_stepped_actions
from tests.conftest import REDIS_DB, make_car
from tests.isolation import RUN
from tests.models import Car

ROOT = Path(__file__).resolve().parents[2]


def invoke(stepped: Stepped, *args: str, no_color: bool = True) -> Result:
    """Run ``celery stepped ARGS`` with the app of ``stepped``."""
    obj = CLIContext(app=stepped.app, no_color=no_color, workdir=None)
    return CliRunner().invoke(stepped_group, list(args), obj=obj, catch_exceptions=False)


def define_trip(stepped: Stepped) -> Any:
    """``trip``: a fan-out (drive, honk, a wait), then a honk skipped by its checksum."""
    app = stepped.app

    @app.stepped_action
    def drive(car: Car, miles: int) -> None:
        car.mileage += miles

    app.stepped_action("honk", actor=Car, checksum=lambda car: "loud")
    trip = app.stepped_action("trip", actor=Car)

    @trip.step
    def leave(step, car, miles):
        step.do(drive, miles)
        step.do("honk")
        step.wait(5)

    @trip.step
    def arrive(step, car, miles):
        step.do("honk")

    return trip


def define_wreck(stepped: Stepped) -> Any:
    """``wreck``: a child that raises, so the failure travels up."""
    app = stepped.app

    @app.stepped_action
    def crash(car: Car) -> None:
        raise RuntimeError("into a wall")

    wreck = app.stepped_action("wreck", actor=Car)

    @wreck.step
    def go(step, car):
        step.do(crash)

    return wreck


def finished_trip(stepped: Stepped, jobs: JobQueue, car: Car) -> int:
    trip = define_trip(stepped)
    action = trip.now(car, 7)
    perform_stepped_actions(stepped)
    assert stepped.get_action(action.id).status == ActionStatus.SUCCEEDED
    return action.id


# -- --help ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["migrate", "tree", "lanes", "actions", "repair"]),
        (["migrate"], ["Alembic", "--revision"]),
        (["tree"], ["ACTION_ID", "--json"]),
        (["lanes"], ["current action", "--json"]),
        (["actions"], ["--status", "--name", "--limit", "--roots", "--json"]),
        (["repair"], ["--apply", "--json", "Redis"]),
    ],
)
def test_help_of_every_subcommand(stepped: Stepped, args: list[str], expected: list[str]) -> None:
    result = invoke(stepped, *args, "--help")
    assert result.exit_code == 0, result.output
    for word in expected:
        assert word in result.output


# -- tree --------------------------------------------------------------------------------------


def test_tree_shows_steps_children_waits_and_skips(
    stepped: Stepped, stepped_jobs: JobQueue, car: Car
) -> None:
    root = finished_trip(stepped, stepped_jobs, car)
    result = invoke(stepped, "tree", str(root))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"#{root} trip(7) on Car/{car.id}: succeeded in ")
    assert lines[1].startswith("├─ step 1/2 leave: succeeded in ")
    children = stepped.get_action(root).steps[0].actions
    drive, honk = sorted(children, key=lambda a: a.name)
    assert any(f"#{drive.id} drive(7) on Car/{car.id}: succeeded in " in x for x in lines)
    assert any(f"#{honk.id} honk on Car/{car.id}: succeeded in " in x for x in lines)
    assert any(x.endswith("wait 5s: done") for x in lines)
    assert lines[-2].startswith("└─ step 2/2 arrive: succeeded in ")
    assert lines[-1].endswith(
        f"honk on Car/{car.id}: skipped, succeeded without running (already achieved)"
    )


def test_tree_json_is_the_whole_tree(stepped: Stepped, stepped_jobs: JobQueue, car: Car) -> None:
    root = finished_trip(stepped, stepped_jobs, car)
    result = invoke(stepped, "tree", str(root), "--json")
    assert result.exit_code == 0, result.output
    tree = json.loads(result.output)
    assert (tree["id"], tree["name"], tree["status"]) == (root, "trip", "succeeded")
    assert (tree["root"], tree["arguments"], tree["actor"]) == (True, [7], f"Car/{car.id}")
    assert (tree["current_step_index"], tree["step_count"]) == (1, 2)
    assert tree["duration_seconds"] >= 0
    first, second = tree["steps"]
    assert (first["index"], first["name"], first["status"]) == (0, "leave", "succeeded")
    kinds = [(m["kind"], m.get("name")) for m in first["members"]]
    assert kinds == [("action", "drive"), ("action", "honk"), ("wait", None)]
    drive = first["members"][0]["action"]
    assert (drive["name"], drive["status"], drive["root"]) == ("drive", "succeeded", False)
    assert [s["status"] for s in drive["steps"]] == ["succeeded"]
    assert first["members"][2]["seconds"] == 5
    skipped = second["members"][0]
    assert skipped["action"] is None
    assert (skipped["skipped"], skipped["outcome"]) == (True, "succeeded")
    assert skipped["reason"] == "already achieved"


def test_tree_of_a_running_action_shows_where_it_waits(
    stepped: Stepped, stepped_jobs: JobQueue, car: Car
) -> None:
    trip = define_trip(stepped)
    action = trip.now(car, 2)
    result = invoke(stepped, "tree", str(action.id))
    lines = result.output.splitlines()
    assert "performing for" in lines[0] and "at step 1/2 leave" in lines[0]
    assert lines[1] == "└─ step 1/2 leave: performing, waiting on 3 of 3"
    # Its parent's step wrote the child's pending row; its own start has not run yet.
    assert lines[2].endswith(f"drive(2) on Car/{car.id}: pending in lane Car/{car.id}/drive")
    assert lines[-1].endswith("wait 5s: waiting")
    tree = json.loads(invoke(stepped, "tree", str(action.id), "--json").output)
    assert tree["status"] == "performing"
    assert tree["steps"][0]["pending_members"] == 3


def test_tree_shows_a_failure_travelling_up(
    stepped: Stepped, stepped_jobs: JobQueue, car: Car
) -> None:
    wreck = define_wreck(stepped)
    action = wreck.now(car)
    perform_stepped_actions(stepped)
    lines = invoke(stepped, "tree", str(action.id)).output.splitlines()
    assert lines[0].startswith(f"#{action.id} wreck on Car/{car.id}: failed in ")
    assert lines[1].startswith("└─ step 1/1 go: failed in ")
    assert lines[1].endswith("(1 of 1 unsuccessful)")
    assert " crash on " in lines[2] and ": failed in " in lines[2]
    assert lines[3].strip().startswith("└─ step 1/1 crash: failed in ")


def test_tree_draws_with_rich_on_a_terminal(
    stepped: Stepped, stepped_jobs: JobQueue, car: Car, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = finished_trip(stepped, stepped_jobs, car)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    colored = invoke(stepped, "tree", str(root), no_color=False).output
    assert "\x1b[" in colored  # ANSI colours
    assert "trip(7)" in colored and "└── " in colored  # rich's tree guides
    plain = invoke(stepped, "tree", str(root), no_color=True).output
    assert "\x1b[3" not in plain and "trip(7)" in plain


# -- lanes --------------------------------------------------------------------------------------


def test_lanes_show_current_and_pending_with_ages(stepped: Stepped, stepped_jobs: JobQueue) -> None:
    paint = stepped.app.stepped_action("paint", actor=Car, outbound=True, concurrency_key="booth")

    @paint.step
    def spray(step, car):
        car.note("sprayed")

    first, second, third = (make_car(stepped) for _ in range(3))
    current = paint.now(first)
    superseded = paint.now(second)
    pending = paint.now(third)
    assert stepped.get_action(superseded.id).status == ActionStatus.SUPERSEDED

    result = invoke(stepped, "lanes")
    assert result.exit_code == 0, result.output
    header, row = result.output.splitlines()
    assert header.split() == ["LANE", "CURRENT", "PENDING"]
    assert row.startswith("booth ")
    assert f"#{current.id} paint Car/{first.id} performing " in row
    assert f"#{pending.id} paint Car/{third.id} pending " in row
    assert f"#{superseded.id} " not in row

    lanes = json.loads(invoke(stepped, "lanes", "--json").output)
    assert [lane["key"] for lane in lanes] == ["booth"]
    assert lanes[0]["current"]["id"] == current.id
    assert [p["id"] for p in lanes[0]["pending"]] == [pending.id]
    assert lanes[0]["current"]["age_seconds"] >= 0
    assert lanes[0]["pending"][0]["status"] == "pending"


def test_lanes_when_there_are_none(stepped: Stepped) -> None:
    assert invoke(stepped, "lanes").output.strip() == "No lanes: nothing is performing or pending."
    assert json.loads(invoke(stepped, "lanes", "--json").output) == []


# -- actions --------------------------------------------------------------------------------------


def test_actions_lists_filters_and_limits(
    stepped: Stepped, stepped_jobs: JobQueue, car: Car
) -> None:
    root = finished_trip(stepped, stepped_jobs, car)
    wreck = define_wreck(stepped).now(car)
    perform_stepped_actions(stepped)

    everything = json.loads(invoke(stepped, "actions", "--json").output)
    ids = [a["id"] for a in everything]
    assert ids == sorted(ids, reverse=True)
    assert {a["name"] for a in everything} == {"trip", "drive", "honk", "wreck", "crash"}

    roots = json.loads(invoke(stepped, "actions", "--roots", "--json").output)
    assert [(a["id"], a["name"]) for a in roots] == [(wreck.id, "wreck"), (root, "trip")]
    assert roots[1]["step_count"] == 2 and roots[1]["current_step_index"] == 1

    failed = json.loads(invoke(stepped, "actions", "--status", "failed", "--json").output)
    assert sorted(a["name"] for a in failed) == ["crash", "wreck"]
    both = invoke(stepped, "actions", "--status", "failed", "--status", "succeeded", "--json")
    assert len(json.loads(both.output)) == len(everything)
    honks = json.loads(invoke(stepped, "actions", "--name", "honk", "--json").output)
    assert [a["name"] for a in honks] == ["honk"]
    assert len(json.loads(invoke(stepped, "actions", "--limit", "2", "--json").output)) == 2

    table = invoke(stepped, "actions", "--roots").output.splitlines()
    assert table[0].split() == [
        "ID", "NAME", "ACTOR", "STATUS", "STEP", "ROOT", "CREATED", "(UTC)", "DURATION"
    ]  # fmt: skip
    assert table[1].split()[:6] == [str(wreck.id), "wreck", f"Car/{car.id}", "failed", "1/1", "yes"]
    assert table[2].split()[:6] == [str(root), "trip", f"Car/{car.id}", "succeeded", "2/2", "yes"]


def test_actions_rejects_an_unknown_status_and_says_when_empty(stepped: Stepped) -> None:
    result = CliRunner().invoke(
        stepped_group,
        ["actions", "--status", "lost"],
        obj=CLIContext(app=stepped.app, no_color=True, workdir=None),
    )
    assert result.exit_code == 2
    assert "'lost' is not one of" in result.output
    assert invoke(stepped, "actions").output.strip() == "No actions match."


# -- migrate ------------------------------------------------------------------------------------


def test_migrate_creates_the_tables_once(stepped: Stepped) -> None:
    stepped.drop_all()
    with stepped.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS stepped_alembic_version"))
    assert "stepped_actions" not in sa_inspect(stepped.engine).get_table_names()

    result = invoke(stepped, "migrate")
    assert result.exit_code == 0, result.output
    assert "migrated to head" in result.output
    tables = set(sa_inspect(stepped.engine).get_table_names())
    assert {"stepped_actions", "stepped_steps", "stepped_parent_links"} <= tables
    assert {"stepped_achievements", "stepped_alembic_version"} <= tables
    with stepped.engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM stepped_alembic_version")).all()
    assert len(versions) == 1
    assert invoke(stepped, "migrate").exit_code == 0  # already at head: nothing to do


def test_without_a_stepped_instance_it_says_so(stepped: Stepped) -> None:
    from celery import Celery

    bare = Celery("bare", set_as_current=False)
    result = CliRunner().invoke(
        stepped_group, ["actions"], obj=CLIContext(app=bare, no_color=True, workdir=None)
    )
    assert result.exit_code == 2
    assert "has no Stepped instance" in result.output


# -- repair ------------------------------------------------------------------------------------


def test_repair_reports_then_applies(stepped: Stepped, stepped_jobs: JobQueue) -> None:
    paint = stepped.app.stepped_action("paint", actor=Car, outbound=True, concurrency_key="booth")

    @paint.step
    def spray(step, car):
        car.note("sprayed")

    current = paint.now(make_car(stepped))
    pending = paint.now(make_car(stepped))
    assert invoke(stepped, "repair").output.strip() == (
        "Nothing to repair: lanes and steps agree with SQL."
    )
    stepped.lanes.clear()  # Redis lost the lanes
    expected = f"lane 'booth': missing -> current {current.id}, pending {pending.id}"

    dry = invoke(stepped, "repair")
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines() == [
        expected,
        "Dry run: run again with --apply to make these changes.",
    ]
    report = json.loads(invoke(stepped, "repair", "--json").output)
    assert (report["applied"], report["lines"]) == (False, [expected])
    assert stepped.lanes.get("booth") is None  # a dry run changes nothing

    applied = invoke(stepped, "repair", "--apply")
    assert applied.output.splitlines() == [expected]
    lane = stepped.lanes.get("booth")
    assert lane is not None
    assert (lane.current_id, lane.pending_ids) == (current.id, [pending.id])
    assert json.loads(invoke(stepped, "repair", "--json").output)["lines"] == []


# -- the celery entry point ---------------------------------------------------------------------

CLI_APP = """
import os
from celery import Celery
from celery_stepped import Stepped
from tests.models import Car

app = Celery("cli_app", broker=os.environ["CLI_BROKER_URL"], set_as_current=False)
stepped = Stepped(
    app,
    database_url=os.environ["CLI_DATABASE_URL"],
    redis_url=os.environ["CLI_REDIS_URL"],
    namespace=os.environ["CLI_NAMESPACE"],
)
trip = app.stepped_action("trip", actor=Car)


@trip.step
def leave(step, car, miles):
    step.do("drive", miles)
    step.do("honk")
    step.wait(5)


@trip.step
def arrive(step, car, miles):
    step.do("honk")
"""


def test_celery_command_line_runs_the_subcommands(
    stepped: Stepped,
    stepped_jobs: JobQueue,
    car: Car,
    database_url: str,
    redis_base: str,
    tmp_path: Path,
) -> None:
    root = finished_trip(stepped, stepped_jobs, car)
    (tmp_path / "cli_app.py").write_text(textwrap.dedent(CLI_APP))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "CLI_BROKER_URL": f"{redis_base}/15",
        "CLI_DATABASE_URL": database_url,
        "CLI_REDIS_URL": f"{redis_base}/{REDIS_DB}",
        "CLI_NAMESPACE": RUN,
    }

    def celery(*args: str) -> str:
        command = [sys.executable, "-m", "celery", "--workdir", str(tmp_path), "-A", "cli_app"]
        done = subprocess.run(
            [*command, "stepped", *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "Commands:" in celery("--help")
    tree = json.loads(celery("tree", str(root), "--json"))
    assert (tree["id"], tree["status"], tree["step_count"]) == (root, "succeeded", 2)
    assert [s["name"] for s in tree["steps"]] == ["leave", "arrive"]
    listed = json.loads(celery("actions", "--roots", "--json"))
    assert [a["id"] for a in listed] == [root]
    assert celery("lanes").strip() == "No lanes: nothing is performing or pending."
