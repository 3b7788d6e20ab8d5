"""Two worker processes on one database: joins under contention, no lock held by a body.

With the embedded defaults both workers share one SQLite file (WAL, busy timeout,
short write transactions); with ``STEPPED_DATABASE_URL`` they share PostgreSQL.
"""

from __future__ import annotations

import pytest

from tests.integration import worker_app
from tests.integration.conftest import Cluster, make_cluster


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_base: str
) -> Cluster:
    """Two worker processes with two pool processes each."""
    return make_cluster(request, tmp_path_factory, redis_base, workers=2)


def test_the_workers_share_one_database_file_in_wal_mode(it: Cluster) -> None:
    engine = it.stepped.engine
    if engine.dialect.name != "sqlite":
        assert engine.dialect.name == "postgresql"
        return
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    assert len(it.workers) == 2
    assert all(w.env[worker_app.ENV_DATABASE] == str(engine.url) for w in it.workers)


def test_500_children_finishing_at_once_advance_their_step_exactly_once(it: Cluster) -> None:
    car = it.make_car()
    root = it.wait_final(it.later("fan_root", car, 500), timeout=240)
    assert root.status == "succeeded"
    first = root.steps[0]
    assert (first.status, first.pending_actions_count, first.unsuccessful_actions_count) == (
        "succeeded",
        0,
        0,
    )
    assert [s.status for s in root.steps] == ["succeeded", "succeeded"]
    stored = it.car(car.id)
    assert (stored.honks, stored.log) == (500, "fanned;")
    leaves = it.actions("fan_leaf")
    assert len(leaves) == 500 and {a.status for a in leaves} == {"succeeded"}
    it.quiet()
    assert it.probe.count(f"step_completed:{first.id}") == 1
    assert it.probe.count(f"action_completed:{root.id}") == 1
    it.assert_signals_once()
    # Both worker processes ran children (so their joins really raced).
    ran_in = it.probe.pids()
    for worker in it.workers:
        assert ran_in & set(worker.child_pids()), "a worker ran no child"
    for worker in it.workers:
        assert "database is locked" not in worker.read_log()


def test_no_write_lock_is_held_while_a_step_body_runs(it: Cluster) -> None:
    car = it.make_car()
    it.probe.release("root-2")
    root = it.later("blocking_root", car, 20)
    it.wait_for("the blocker's body to block", lambda: it.probe.entered("body"))
    # While that body waits, the other processes write: 20 children start, run their
    # bodies, complete and report to the root step.
    it.wait_for(
        "20 children to succeed while a body blocks",
        lambda: (
            len(it.actions("fan_leaf")) == 20
            and {a.status for a in it.actions("fan_leaf")} == {"succeeded"}
        ),
    )
    assert it.car(car.id).honks == 20
    it.wait_for(
        "the 20 children to report (the blocker has not)",
        lambda: it.stepped.get_action(root).steps[0].pending_actions_count == 1,
    )
    assert it.probe.count("entered:body") == 1
    it.probe.release("body")
    done = it.wait_final(root)
    assert done.status == "succeeded"
    assert it.log_tokens(car.id) == ["blocker-1", "blocker-2", "root-2", "root-3"]
    it.quiet()
    it.assert_signals_once()
    for worker in it.workers:
        assert "database is locked" not in worker.read_log()
