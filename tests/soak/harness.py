"""The soak's moving parts: a Redis of its own that can crash, worker processes that can
be killed, the driver that starts roots and completes outbound actions, and the faults.

The soak's broker and lanes live on a private embedded Redis (started here, on a port of
its own), also when ``STEPPED_REDIS_URL`` names the machine's Redis: killing that one
would harm whoever else uses it. The database is the run's (a SQLite file, or the run's
PostgreSQL schema, connections named ``<schema>-soak`` so that the connection cut hits
them only).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

from celery_stepped import Stepped
from celery_stepped.embedded import EmbeddedRedis, WorkerProcess
from celery_stepped.models import Action
from tests.soak import soak_app

ROOT = Path(__file__).resolve().parents[2]
#: Driver completes these outbound children (by seed): most succeed, some fail.
OUTBOUND_COMPLETED = 0.7


class CrashableRedis:
    """An embedded Redis that can be killed (SIGKILL, no persistence) and started again,
    empty, on the same port."""

    def __init__(self) -> None:
        self.server = EmbeddedRedis().start()
        self.port = self.server.port

    @property
    def url(self) -> str:
        return f"{self.server.url}/0"

    def crash_and_restart(self) -> None:
        """Kill the server as a crash would and start an empty one in its place."""
        process = self.server.process
        if process is not None:
            process.kill()
            process.wait(10)
        self.server.stop()
        self.server = EmbeddedRedis(port=self.port).start()

    def stop(self) -> None:
        self.server.stop()


class Workers:
    """The soak's worker processes: killed on demand, restarted when they exit."""

    def __init__(self, env: dict[str, str], logs: Path, count: int = 2) -> None:
        self.env = env
        self.logs = logs
        self.started = 0
        self.exits: list[str] = []
        self.workers = [self._start() for _ in range(count)]

    def _start(self) -> WorkerProcess:
        worker = WorkerProcess(
            "tests.soak.soak_app",
            queues="stepped,celery",
            concurrency=2,
            env=self.env,
            cwd=str(ROOT),
            logfile=str(self.logs / f"worker-{self.started}.log"),
        )
        self.started += 1
        return worker.start(ready_timeout=120)

    def busy(self) -> WorkerProcess:
        """A worker that is running a task now, when one can be found soon."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for worker in self.workers:
                if _running_task(worker):
                    return worker
            time.sleep(0.01)
        return random.choice(self.workers)

    def kill_one(self) -> None:
        """SIGKILL a busy worker (its pool included) and start a new one."""
        victim = self.busy()
        victim.kill()
        self.workers.remove(victim)
        self.workers.append(self._start())

    def revive(self) -> None:
        """Start a new worker for each one that exited on its own (and say why)."""
        for worker in list(self.workers):
            if worker.process is not None and worker.process.poll() is None:
                continue
            tail = worker.read_log()[-2000:] + worker.read_console()[-2000:]
            self.exits.append(tail)
            worker.stop()
            self.workers.remove(worker)
            self.workers.append(self._start())

    def stop(self) -> None:
        while self.workers:
            self.workers.pop().stop()


def _running_task(worker: WorkerProcess) -> bool:
    """Whether one of the worker's pool processes is on the CPU (running a task)."""
    for pid in worker.child_pids():
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "R":
            return True
    return False


class Driver:
    """Starts roots and completes outbound children, as an application would."""

    def __init__(self, stepped: Stepped, widget: Any, seed: int) -> None:
        self.stepped = stepped
        self.widget = widget
        self.rng = random.Random(seed)
        self.requests: list[str] = []
        self.completed: set[int] = set()
        self.root = stepped.registry.find(soak_app.Widget, "soak_root")
        #: Roots up to this id wait for repair (Redis lost their messages): not counted
        #: as open, so the driver keeps the load up meanwhile.
        self.stalled_up_to = 0

    def launch(self, count: int) -> None:
        """Start ``count`` roots through the broker."""
        for _ in range(count):
            lane = self.rng.choice(soak_app.ROOT_LANES)
            result = self.root.later(self.widget, lane, self.rng.randrange(10**9))
            self.requests.append(result.id)

    def rows(self) -> int:
        with self.stepped.session() as s:
            return int(s.scalar(select(func.count(Action.id))) or 0)

    def open_roots(self) -> int:
        with self.stepped.session() as s:
            return int(
                s.scalar(
                    select(func.count(Action.id)).where(
                        Action.root.is_(True),
                        Action.status.in_(("pending", "performing")),
                        Action.id > self.stalled_up_to,
                    )
                )
                or 0
            )

    def mark_stalled(self) -> None:
        """Redis is about to be lost: the open roots will wait for repair."""
        with self.stepped.session() as s:
            self.stalled_up_to = int(s.scalar(select(func.max(Action.id))) or 0)

    def complete_outbound(self) -> int:
        """Complete the ready ``soak_out`` children the driver answers (by their seed)."""
        with self.stepped.session() as s:
            rows = s.execute(
                select(Action.id, Action.arguments).where(
                    Action.name == "soak_out",
                    Action.status == "performing",
                    Action.current_step_index >= 1,
                )
            ).all()
        done = 0
        for action_id, arguments in rows:
            seed = int(arguments[-1])
            if action_id in self.completed or (seed % 100) >= OUTBOUND_COMPLETED * 100:
                continue
            self.completed.add(action_id)
            self.stepped.complete(action_id, "failed" if seed % 7 == 0 else "succeeded")
            done += 1
        return done


def cut_database_connections(admin_url: str, application_name: str) -> int:
    """PostgreSQL: terminate every connection named ``application_name`` (the soak's)."""
    from sqlalchemy import create_engine

    engine = create_engine(admin_url)
    try:
        with engine.begin() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": application_name},
                ).all()
            )
    finally:
        engine.dispose()


def soak_env(redis_url: str, database_url: str, name: str) -> dict[str, str]:
    """The environment of the soak's workers."""
    return {
        soak_app.ENV_REDIS: redis_url,
        soak_app.ENV_DATABASE: database_url,
        soak_app.ENV_NAME: name,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
