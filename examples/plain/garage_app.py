"""The garage: a Celery app, its models and its stepped actions.

Both the example script (``garage.py``) and its worker (``celery -A garage_app worker``)
import this module. It is configured from the environment:

- ``GARAGE_REDIS_URL``: Redis server without a database number (broker on ``/0``,
  Stepped's lanes on ``/1`` in the namespace ``garage``); default
  ``redis://127.0.0.1:6379``. Every task, Stepped's and the garage's own, goes to the
  queue ``garage`` (``celery -A garage_app worker -Q garage``), so the Flask shop
  example on the same Redis (databases 2 and 3, queue ``shop``) never takes its work.
- ``GARAGE_DATABASE_URL``: SQLAlchemy URL of the tables; default ``sqlite:///garage.db``.

A ``service`` of a car is a tree of actions::

    service(car, color)
      1 check_in        inspect (checksum: plate + mileage; records the faults it finds)
      2 quote           approve_quote (outbound: the fleet owner approves by webhook)
      3 repair          repair_part(part) for every fault, in parallel, one lane per part
      4 paint_and_wash  paint(color) -> bake on the booth (ONE shared lane for all cars:
                        a newer pending bake supersedes older ones, which it cures too),
                        and wash (a job-backed action: a plain Celery task)
      5 handover        inspect again: same plate and mileage, so it is skipped
"""

from __future__ import annotations

import os

from celery import Celery
from sqlalchemy import JSON, ForeignKey, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_stepped import Step, Stepped
from celery_stepped.models import Action

REDIS_URL = os.environ.get("GARAGE_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
DATABASE_URL = os.environ.get("GARAGE_DATABASE_URL", "sqlite:///garage.db")

QUEUE = "garage"

app = Celery("garage", broker=f"{REDIS_URL}/0")
app.conf.update(
    task_default_queue=QUEUE,  # the garage's own tasks (wash)
    task_ignore_result=True,  # Stepped keeps its state in SQL: no result backend needed
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
stepped = Stepped(
    app, database_url=DATABASE_URL, redis_url=f"{REDIS_URL}/1", queue=QUEUE, namespace="garage"
)


# -- models (any SQLAlchemy model is an actor) ------------------------------------------


class GarageBase(DeclarativeBase):
    """Declarative base of the garage's own tables."""


class Car(GarageBase):
    """A car of the fleet."""

    __tablename__ = "cars"

    id: Mapped[int] = mapped_column(primary_key=True)
    plate: Mapped[str] = mapped_column(String(20))
    model: Mapped[str] = mapped_column(String(40))
    mileage: Mapped[int] = mapped_column(default=0)
    faults: Mapped[list[str]] = mapped_column(JSON, default=list)  # what is really broken
    color: Mapped[str] = mapped_column(String(20), default="grey")
    paint: Mapped[str] = mapped_column(String(20), default="original")
    washed: Mapped[bool] = mapped_column(default=False)
    quote: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(String(40), default="parked")


class Part(GarageBase):
    """A fault found by an inspection, and what became of it."""

    __tablename__ = "parts"

    id: Mapped[int] = mapped_column(primary_key=True)
    car_id: Mapped[int] = mapped_column(ForeignKey("cars.id"))
    name: Mapped[str] = mapped_column(String(40))
    state: Mapped[str] = mapped_column(String(20), default="found")


class Booth(GarageBase):
    """The paint booth: its oven cures every sprayed car inside in one cycle."""

    __tablename__ = "booths"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    cycles: Mapped[int] = mapped_column(default=0)


class PartUnavailable(Exception):
    """The part needed for a repair cannot be delivered."""


BACK_ORDERED = {"gearbox"}
HOURS = {"brakes": 0.6, "clutch": 0.9, "exhaust": 0.5, "gearbox": 0.7, "lights": 0.3}
OVEN_CYCLE = 1.5  # seconds


def create_tables() -> None:
    """Create Stepped's tables and the garage's."""
    stepped.create_all()
    GarageBase.metadata.create_all(stepped.engine)


# -- inspect: a checksum makes a repeated inspection a no-op ---------------------------

inspect_car = app.stepped_action(
    "inspect", actor=Car, checksum=lambda car: {"plate": car.plate, "mileage": car.mileage}
)


@inspect_car.step
def look_over(step: Step, car: Car) -> None:
    car.status = "inspecting"
    step.wait(0.3)  # the mechanic walks round the car


@inspect_car.step
def write_up(step: Step, car: Car) -> None:
    known = set(step.session.scalars(select(Part.name).where(Part.car_id == car.id)))
    step.session.add_all(Part(car_id=car.id, name=f) for f in car.faults if f not in known)


# -- approve_quote: outbound, completed by the fleet owner's webhook ----------------------

approve_quote = app.stepped_action("approve_quote", actor=Car, outbound=True, timeout=30)


@approve_quote.step
def send_quote(step: Step, car: Car) -> None:
    parts = step.session.scalars(select(Part.name).where(Part.car_id == car.id)).all()
    car.quote = 80 + sum(int(HOURS.get(p, 0.5) * 200) for p in parts)
    car.status = "awaiting approval"
    # A real app would e-mail the owner here; the owner's "approve" webhook then calls
    # approve_quote.complete_now(car) (see garage.py).


# -- repair_part: parallel repairs, one lane per part of a car ----------------------------

repair_part = app.stepped_action(
    "repair_part", actor=Car, concurrency_key=lambda car, part: ["Car", car.id, "repair", part]
)


@repair_part.step
def order_part(step: Step, car: Car, part: str) -> None:
    if part in BACK_ORDERED:
        raise PartUnavailable(f"{part} for the {car.model} is back-ordered for 3 weeks")
    step.wait(HOURS.get(part, 0.5))  # the mechanic at work


@repair_part.step
def fit_part(step: Step, car: Car, part: str) -> None:
    row = step.session.scalar(select(Part).where(Part.car_id == car.id, Part.name == part))
    if row is not None:
        row.state = "repaired"


# -- paint: spray the car, then wait for an oven cycle of the shared booth -----------------

paint = app.stepped_action("paint", actor=Car)


@paint.step
def spray(step: Step, car: Car, color: str) -> None:
    car.color, car.paint = color, "sprayed"
    step.wait(0.2)


@paint.step
def cure(step: Step, car: Car, color: str) -> None:
    step.on(step.session.get(Booth, 1), "bake")


# One lane for the booth (its tenancy key, Booth/1/bake): one cycle at a time. A bake
# requested while the oven runs waits; a newer request supersedes it, and the newer
# cycle cures every sprayed car, so the superseded requester's step waits on it.
bake = app.stepped_action("bake", actor=Booth)


@bake.step
def load_oven(step: Step, booth: Booth) -> None:
    for car in step.session.scalars(select(Car).where(Car.paint == "sprayed")):
        car.paint = "baking"
    step.wait(OVEN_CYCLE)


@bake.step
def unload_oven(step: Step, booth: Booth) -> None:
    for car in step.session.scalars(select(Car).where(Car.paint == "baking")):
        car.paint = "cured"
    booth.cycles += 1


# -- wash: a job-backed action (a plain Celery task completes it) -------------------------


@app.task(name="garage.wash_car")
def wash_car(action_id: int) -> None:
    """Wash the car of a ``wash`` action, then complete the action."""
    action = stepped.get_action(action_id)
    with stepped.session() as session:
        car = session.get_one(Car, int(action.actor_id))
        car.washed = True
    stepped.complete(action)


wash = app.stepped_action("wash", actor=Car, job=wash_car)


# -- service: the root action of every car --------------------------------------------------

service = app.stepped_action("service", actor=Car)


@service.step
def check_in(step: Step, car: Car, color: str) -> None:
    car.status = "checked in"
    step.do(inspect_car)


@service.step
def quote(step: Step, car: Car, color: str) -> None:
    step.do(approve_quote)


@service.step
def repair(step: Step, car: Car, color: str) -> None:
    car.status = "in the workshop"
    for part in step.session.scalars(select(Part.name).where(Part.car_id == car.id)):
        step.do(repair_part, part)


@service.step
def paint_and_wash(step: Step, car: Car, color: str) -> None:
    car.status = "painting"
    step.do(paint, color)
    step.do(wash)


@service.step
def handover(step: Step, car: Car, color: str) -> None:
    step.do(inspect_car)  # same plate and mileage as at check-in: already achieved


@service.succeeded
def ready(action: Action, car: Car, color: str) -> None:
    car.status = "ready for pickup"


@service.failed
def waiting_for_parts(action: Action, car: Car, color: str) -> None:
    car.status = "waiting for parts"


__all__ = ["Booth", "Car", "Part", "app", "create_tables", "service", "stepped"]
