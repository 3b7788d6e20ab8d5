"""The Celery app, Stepped instance and actions of the soak (``tests/soak``).

Imported by ``celery -A tests.soak.soak_app worker`` in each worker subprocess (which
builds :data:`app` from the ``SOAK_*`` environment variables) and by the test process,
which calls :func:`build` with the same URLs.

Every step body inserts one :class:`Effect` row whose key names the action and the step
(``<action id>:<step index>``), in the body's own transaction; the key has no unique
constraint, so a body that ran twice and committed twice shows as two rows (the audit
counts them). Trees are three levels deep: ``soak_root`` -> ``soak_mid`` (and timed
waits, outbound children, a child that times out) -> ``soak_leaf``. Every action joins
one of :data:`LANES` lanes (``soak/<n>``): roots in the first fifth, mids in the next
two, leaves and outbound children in the rest, so no child ever waits on a lane its
ancestor holds. Which lane, how many children, which fail and which carry a checksum
is drawn from the ``seed`` argument, so a tree is the same whoever runs it.
"""

from __future__ import annotations

import os
import random
from typing import Any

from celery import Celery
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_stepped import Stepped

ENV_REDIS = "SOAK_REDIS_URL"
ENV_DATABASE = "SOAK_DATABASE_URL"
ENV_NAME = "SOAK_NAME"

#: How many lanes the soak's actions share.
LANES = 50
#: Lanes of roots, mids and leaves (outbound children share the leaves' lanes).
ROOT_LANES = range(0, 10)
MID_LANES = range(10, 30)
LEAF_LANES = range(30, LANES)
#: Seconds an outbound child that the driver never completes waits for its timeout.
OUTBOUND_TIMEOUT = 2.0
#: Seconds a ``soak_stuck`` child waits for its timeout (nobody completes it).
STUCK_TIMEOUT = 1.0


class SoakBase(DeclarativeBase):
    """Tables of the soak's own: its actor and the step bodies' side effects."""


class Widget(SoakBase):
    """The soak's actor."""

    __tablename__ = "soak_widgets"
    id: Mapped[int] = mapped_column(primary_key=True)


class Effect(SoakBase):
    """One row per step body that committed: ``key`` is ``<action id>:<step index>``."""

    __tablename__ = "soak_effects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)


def effect(step: Any, index: int) -> None:
    """The body's side effect, in the body's own transaction."""
    step.session.add(Effect(key=f"{step.action.id}:{index}"))


def lane_key(widget: Widget, lane: int, *args: Any) -> str:
    """Every soak action's concurrency key: its lane."""
    return f"soak/{lane}"


def shape(seed: int) -> random.Random:
    """The random source of one action's choices."""
    return random.Random(seed)


def define(stepped: Stepped) -> None:
    """The soak's actions on ``stepped``."""
    define_root(stepped)
    define_mid(stepped)
    define_leaves(stepped)


def define_root(stepped: Stepped) -> None:
    """``soak_root``: mids, a timed wait, now and then an outbound child or a timeout."""
    root = stepped.app.stepped_action("soak_root", actor=Widget, concurrency_key=lane_key)

    @root.step
    def fan_out(step: Any, widget: Widget, lane: int, seed: int) -> None:
        effect(step, 0)
        rng = shape(seed)
        for _ in range(rng.randint(2, 4)):
            step.do("soak_mid", rng.choice(MID_LANES), rng.randrange(10**9))
        step.wait(rng.uniform(0.05, 0.5))
        if rng.random() < 0.5:
            step.do("soak_out", rng.choice(LEAF_LANES), rng.randrange(10**9))
        if rng.random() < 0.1:
            step.do("soak_stuck", rng.choice(LEAF_LANES))

    @root.step
    def close(step: Any, widget: Widget, lane: int, seed: int) -> None:
        effect(step, 1)


def mid_checksum(widget: Widget, lane: int, seed: int) -> Any:
    """A third of the mids carry a checksum shared by many: skipped or shared."""
    return {"group": seed % 4} if seed % 3 == 0 else None


def define_mid(stepped: Stepped) -> None:
    """``soak_mid``: leaves; a twentieth of them fail their second step."""
    mid = stepped.app.stepped_action(
        "soak_mid", actor=Widget, concurrency_key=lane_key, checksum=mid_checksum
    )

    @mid.step
    def leaves(step: Any, widget: Widget, lane: int, seed: int) -> None:
        effect(step, 0)
        rng = shape(seed)
        for _ in range(rng.randint(2, 5)):
            step.do("soak_leaf", rng.choice(LEAF_LANES), rng.randrange(10**9))

    @mid.step
    def after_leaves(step: Any, widget: Widget, lane: int, seed: int) -> None:
        effect(step, 1)
        if seed % 20 == 1:
            step.status = "failed"


def leaf_checksum(widget: Widget, lane: int, seed: int) -> Any:
    """A fifth of the leaves carry a checksum (few values: skips and shares)."""
    return {"leaf": seed % 3} if seed % 5 == 0 else None


def define_leaves(stepped: Stepped) -> None:
    """``soak_leaf`` (one step, a tenth fail), ``soak_out`` (outbound, completed by the
    driver or timed out) and ``soak_stuck`` (outbound, never completed: times out)."""
    app = stepped.app
    leaf = app.stepped_action(
        "soak_leaf", actor=Widget, concurrency_key=lane_key, checksum=leaf_checksum
    )

    @leaf.step
    def leaf_body(step: Any, widget: Widget, lane: int, seed: int) -> None:
        effect(step, 0)
        if seed % 10 == 7:
            step.status = "failed"

    out = app.stepped_action(
        "soak_out",
        actor=Widget,
        outbound=True,
        timeout=OUTBOUND_TIMEOUT,
        concurrency_key=lane_key,
    )

    @out.step
    def out_body(step: Any, widget: Widget, lane: int, seed: int) -> None:
        effect(step, 0)

    stuck = app.stepped_action(
        "soak_stuck", actor=Widget, outbound=True, timeout=STUCK_TIMEOUT, concurrency_key=lane_key
    )

    @stuck.step
    def stuck_body(step: Any, widget: Widget, lane: int) -> None:
        effect(step, 0)


def build(redis_url: str, database_url: str, name: str) -> tuple[Celery, Stepped]:
    """The soak's app and Stepped instance: broker and lanes on ``redis_url`` (broker
    keys prefixed ``<name>:broker:``, lanes in the namespace ``name``)."""
    app = Celery("stepped_soak", broker=redis_url, set_as_current=False)
    app.conf.update(
        stepped_outbox_sweep_after=float(os.environ.get("SOAK_SWEEP_AFTER", 5)),
        stepped_outbox_sweep_every=float(os.environ.get("SOAK_SWEEP_EVERY", 5)),
        accept_content=["json"],
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        broker_transport_options={
            "global_keyprefix": f"{name}:broker:",
            "visibility_timeout": float(os.environ.get("SOAK_VISIBILITY", 10)),
            "unacked_restore_interval": 1,
        },
    )
    stepped = Stepped(app, database_url=database_url, redis_url=redis_url, namespace=name)
    define(stepped)
    return app, stepped


def _from_env() -> Celery | None:
    if ENV_REDIS not in os.environ:
        return None
    app, _ = build(os.environ[ENV_REDIS], os.environ[ENV_DATABASE], os.environ[ENV_NAME])
    return app


#: The worker's app (``celery -A tests.soak.soak_app``); None in the test process.
app = _from_env()
