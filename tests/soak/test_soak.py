"""The soak (issue 15): 5,000 actions over 50 lanes on two prefork workers, with faults
injected at random moments, then an audit that finds nothing lost, duplicated or stuck.

Faults, each once at a random point of the run (by how many actions exist): Redis killed
and restarted empty (the soak's own embedded Redis: broker and lanes), a worker killed
with SIGKILL while it runs a task (twice), and, on PostgreSQL, every connection of the
workers terminated (``pg_terminate_backend``). A worker that exits on its own (Celery's
Redis transport does after a Redis restart, see the README) is started again, as a
supervisor would. A few seconds after Redis came back, ``stepped.repair(apply=True)``
runs once, as an operator would, while the workers and the driver go on (repair must be
safe beside them); after the last root, a drain until every action is final.

Roots whose start message is still in the broker when Redis dies are lost with it, but
not their request: ``later()`` keeps its message in the outbox until the start runs, and
the workers' sweep sends it again (the audit's ``lost`` counts requests without a root).
Pending actions whose lane or begin message Redis lost are healed by the same sweep.
Run with ``pytest -m soak -s tests/soak``; ``.ci/run`` does.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url
from sqlalchemy.exc import OperationalError

from celery_stepped import Stepped
from celery_stepped.models import Base
from tests.isolation import RUN, SCHEMA
from tests.soak import soak_app
from tests.soak.audit import audit
from tests.soak.harness import (
    CrashableRedis,
    Driver,
    Workers,
    cut_database_connections,
    soak_env,
)

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]

#: Actions the run creates before the driver stops starting roots.
TARGET = int(os.environ.get("STEPPED_SOAK_ACTIONS", 5000))
#: Roots open at once (the rest of the load is their trees).
OPEN_ROOTS = 16
#: Seconds after Redis came back before the repair runs.
REPAIR_AFTER = 3.0
#: Seconds the drain may take after the last root.
DRAIN = 240.0
NAME = f"{RUN}-soak"
APPLICATION = f"{SCHEMA}-soak"


class Soak:
    """One soak run: the Redis, the workers, the driver, and the faults still to come."""

    def __init__(self, database_url: str, admin_url: str | None, logs: Path) -> None:
        self.redis = CrashableRedis()
        self.admin_url = admin_url
        worker_url = _named(database_url, APPLICATION) if admin_url else database_url
        driver_url = _named(database_url, f"{APPLICATION}-driver") if admin_url else database_url
        self.app, self.stepped = soak_app.build(self.redis.url, driver_url, NAME)
        _create_tables(self.stepped)
        with self.stepped.session() as s:
            s.add(soak_app.Widget(id=1))
        with self.stepped.session() as s:
            widget = s.get(soak_app.Widget, 1)
            s.expunge(widget)
        seed = int(os.environ.get("STEPPED_SOAK_SEED", random.randrange(10**6)))
        print(f"\nsoak: seed={seed} (STEPPED_SOAK_SEED replays the driver's choices)")
        self.rng = random.Random(seed)
        self.driver = Driver(self.stepped, widget, seed)
        kinds = ["redis", "kill", "kill"] + (["database"] if admin_url else [])
        self.faults = sorted((self.rng.uniform(0.1, 0.8) * TARGET, k) for k in kinds)
        self.injected: list[str] = []
        self.repair_at: float | None = None
        self.workers = Workers(soak_env(self.redis.url, worker_url, NAME), logs)

    def run(self) -> None:
        """Start roots until the target, injecting the faults on the way."""
        deadline = time.monotonic() + 600
        while True:
            rows = _retrying(self.driver.rows)
            if rows >= TARGET:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"soak: only {rows} actions after 600 s")
            while self.faults and rows >= self.faults[0][0]:
                self.inject(self.faults.pop(0)[1])
            if _retrying(self.driver.open_roots) < OPEN_ROOTS:
                self.driver.launch(4)
            self.tend()
            self.maybe_repair()
            time.sleep(0.05)

    def tend(self) -> None:
        """What an application and a supervisor do meanwhile."""
        _retrying(self.driver.complete_outbound)
        self.workers.revive()

    def inject(self, kind: str) -> None:
        self.injected.append(kind)
        if kind == "kill":
            self.workers.kill_one()
        elif kind == "database" and self.admin_url:
            cut_database_connections(self.admin_url, APPLICATION)
        elif kind == "redis":
            self.driver.mark_stalled()
            self.redis.crash_and_restart()
            self.repair_at = time.monotonic() + REPAIR_AFTER

    def maybe_repair(self, now: bool = False) -> None:
        """Repair once, when it is due after Redis was lost."""
        if self.repair_at is None or (time.monotonic() < self.repair_at and not now):
            return
        self.repair_at = None
        report = _retrying(lambda: self.stepped.repair(apply=True))
        print(f"soak: repair beside live workers made {len(report.lines)} change(s)")

    def drain(self) -> None:
        """Wait until every action is final (repair first if it is still due)."""
        self.maybe_repair(now=True)
        deadline = time.monotonic() + DRAIN
        while time.monotonic() < deadline:
            self.tend()
            if not _retrying(self.open_work):
                return
            time.sleep(0.2)

    def open_work(self) -> bool:
        with self.stepped.session() as s:
            from sqlalchemy import func, select

            from celery_stepped.models import Action, OutboxEntry

            open_actions = s.scalar(
                select(func.count(Action.id)).where(Action.status.in_(("pending", "performing")))
            )
            outbox = s.scalar(select(func.count(OutboxEntry.id)))
        return bool(open_actions or outbox or self.stepped.lanes.count())

    def close(self) -> None:
        self.workers.stop()
        self.stepped.redis.close()
        self.stepped.engine.dispose()
        self.redis.stop()


def _named(url: str, name: str) -> str:
    return make_url(url).update_query_dict({"application_name": name}).render_as_string(False)


def _create_tables(stepped: Stepped) -> None:
    engine = stepped.engine
    soak_app.SoakBase.metadata.drop_all(engine)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    soak_app.SoakBase.metadata.create_all(engine)


def _retrying(call, attempts: int = 20):  # type: ignore[no-untyped-def]
    """The driver's own calls survive the faults too (a cut connection, Redis away)."""
    for attempt in range(attempts):
        try:
            return call()
        except (OperationalError, ConnectionError, OSError) as exc:
            if attempt == attempts - 1:
                raise
            print(f"soak: driver retries after {type(exc).__name__}")
            time.sleep(0.5)
    return None


@pytest.fixture
def soak(database_server: str | None, tmp_path: Path) -> Iterator[Soak]:
    database_url = database_server or f"sqlite:///{tmp_path / 'soak.db'}"
    run = Soak(database_url, database_server, tmp_path)
    try:
        yield run
    finally:
        run.close()


def test_soak_loses_duplicates_and_strands_nothing(soak: Soak) -> None:
    started = time.monotonic()
    soak.run()
    soak.drain()
    wall = time.monotonic() - started
    found = audit(soak.stepped, soak.driver.requests)
    print(
        f"soak: actions={found.actions} lanes={soak_app.LANES} faults={len(soak.injected)} "
        f"wall_s={wall:.0f} lost={len(found.lost)} duplicated={len(found.duplicated)} "
        f"stuck={len(found.stuck)}"
    )
    if soak.workers.exits:
        print(f"soak: {len(soak.workers.exits)} worker(s) exited on their own and were restarted")
    assert (found.lost, found.duplicated, found.stuck) == ([], [], []), found.sample()
