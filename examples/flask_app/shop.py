"""A small web shop on Flask + SQLAlchemy + celery_stepped: start trees over HTTP, watch them.

An order is fulfilled by a tree: ``charge`` (outbound: the payment provider calls the
webhook), then ``pack`` and a one-second cool-off wait in parallel, then ``ship``.
``pack`` fails for an item that is sold out (see :data:`SOLD_OUT`), and the order with it.

Run everything at once (an embedded Redis, a worker, the web app)::

    python examples/flask_app/run.py

or each part yourself, from examples/flask_app, with a Redis server::

    export SHOP_REDIS_URL=redis://127.0.0.1:6379 SHOP_DATABASE_URL=sqlite:///shop.db
    celery -A shop:celery_app worker -Q shop
    flask --app shop run

(``celery -A shop`` alone finds the Flask ``app`` of this module first and fails:
name the Celery app, ``shop:celery_app``.)

Routes: ``POST /orders`` ``{"item": "lamp"}``, ``GET /orders/<id>`` (the order and its
tree), ``POST /webhooks/payments/<id>`` ``{"status": "succeeded"}``, ``GET /lanes``, and
the pages of :func:`celery_stepped.contrib.flask.stepped_blueprint` under ``/stepped``
(complete and cancel with the token in ``SHOP_ACTION_TOKEN``).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from flask import Flask, jsonify, request
from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_stepped import ActionStatus, Step, Stepped
from celery_stepped.contrib.flask import stepped_blueprint
from celery_stepped.models import Action
from celery_stepped.views import action_tree, lane_rows

REDIS_URL = os.environ.get("SHOP_REDIS_URL", "redis://127.0.0.1:6379")
DATABASE_URL = os.environ.get("SHOP_DATABASE_URL", "sqlite:///shop.db")

# The shop's own Redis databases (broker /2, lanes /3 in the namespace "shop") and queue,
# so the garage example on the same Redis (/0 and /1, queue "garage") never takes its work.
QUEUE = "shop"
celery_app = Celery("shop", broker=f"{REDIS_URL}/2")
celery_app.conf.task_default_queue = QUEUE
stepped = Stepped(
    celery_app, database_url=DATABASE_URL, redis_url=f"{REDIS_URL}/3", queue=QUEUE, namespace="shop"
)


class ShopBase(DeclarativeBase):
    """Declarative base of the shop's own tables."""


class Order(ShopBase):
    """An order: the actor of every action in the shop."""

    __tablename__ = "shop_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(40), default="new")


def create_tables() -> None:
    """Create the Stepped tables and the shop's."""
    stepped.create_all()
    ShopBase.metadata.create_all(stepped.engine)


# -- the tree ------------------------------------------------------------------------------

charge = celery_app.stepped_action("charge", actor=Order, outbound=True, timeout=3600)


@charge.step
def ask_for_payment(step: Step, order: Order) -> None:
    order.state = "awaiting payment"  # a real shop would call its payment provider here


#: Items the warehouse has none of: packing them fails.
SOLD_OUT = frozenset({"unicorn"})


class SoldOut(Exception):
    """The warehouse has none of the ordered item left."""


@celery_app.stepped_action
def pack(order: Order) -> None:
    if order.item in SOLD_OUT:
        raise SoldOut(f"no {order.item} left in the warehouse")
    order.state = "packed"


@celery_app.stepped_action
def ship(order: Order) -> None:
    order.state = "shipped"


fulfil = celery_app.stepped_action("fulfil", actor=Order)


@fulfil.step
def pay(step: Step, order: Order) -> None:
    step.do(charge)


@fulfil.step
def prepare(step: Step, order: Order) -> None:
    step.do(pack)
    step.wait(1)  # the cool-off period in which the customer may still cancel


@fulfil.step
def send(step: Step, order: Order) -> None:
    step.do(ship)


@fulfil.failed
def give_up(action: Action, order: Order) -> None:
    order.state = "cancelled"


# -- the web app -----------------------------------------------------------------------------

app = Flask(__name__)
app.config["STEPPED_ACTION_TOKEN"] = os.environ.get("SHOP_ACTION_TOKEN")
app.register_blueprint(stepped_blueprint(stepped, allow_actions=True))


def _root_of(order_id: int) -> Action | None:
    with stepped.session() as session:
        return session.scalar(
            select(Action)
            .where(Action.actor_type == "Order", Action.actor_id == str(order_id))
            .where(Action.name == "fulfil", Action.root.is_(True))
            .order_by(Action.id.desc())
            .limit(1)
        )


@app.post("/orders")
def place_order() -> Any:
    """Store an order and start fulfilling it on a worker."""
    item = (request.get_json(silent=True) or {}).get("item")
    if not isinstance(item, str) or not item:
        return jsonify(error='give the item as JSON: {"item": "..."}'), 400
    with stepped.session() as session:
        order = Order(item=item)
        session.add(order)
        session.flush()
        session.expunge(order)
    result = fulfil.later(order)
    return jsonify(order_id=order.id, message_id=result.id), 202


@app.get("/orders/<int:order_id>")
def show_order(order_id: int) -> Any:
    """The order, and the tree fulfilling it (statuses, steps, children, timings)."""
    with stepped.session() as session:
        order = session.get(Order, order_id)
        if order is None:
            return jsonify(error="no such order"), 404
        state = order.state
    root = _root_of(order_id)
    tree = None if root is None else action_tree(stepped, root.id)
    return jsonify(order_id=order_id, state=state, tree=tree)


@app.post("/webhooks/payments/<int:order_id>")
def payment_webhook(order_id: int) -> Any:
    """The payment provider's callback: complete the order's outbound ``charge``."""
    status = (request.get_json(silent=True) or {}).get("status", "succeeded")
    if status not in (s.value for s in ActionStatus if s.value not in ("pending", "performing")):
        return jsonify(error=f"unknown status {status!r}"), 400
    with stepped.session() as session:
        order = session.get(Order, order_id)
        if order is None:
            return jsonify(error="no such order"), 404
        session.expunge(order)
    try:
        completed = charge.complete_now(order, status=status)
    except ValueError as exc:
        return jsonify(error=str(exc)), 400
    if completed is None:
        return jsonify(error="no payment is being waited for"), 409
    return jsonify(action_id=completed.id, status=completed.status)


@app.get("/lanes")
def show_lanes() -> Any:
    """Every lane: its current action and the pending ones."""
    return jsonify(lanes=lane_rows(stepped))
