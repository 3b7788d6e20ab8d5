"""The Celery app, Stepped instance and test actions of the integration suite.

Imported twice: by ``celery -A tests.integration.worker_app worker -Q stepped`` in a
worker subprocess (which builds :data:`app` from the ``STEPPED_TEST_*`` environment
variables the fixtures pass) and by the test process, which calls :func:`build` with
the same URLs so both sides share one set of definitions.

Step bodies record their effects in SQL with atomic statements (``log = log || x``,
``honks = honks + 1``), so a body that ran twice but committed once shows once. A
:class:`Probe` (Redis keys of its own prefix) counts what happened outside SQL: signal
deliveries in every process, body executions, message content types; it also holds
the flags a blocking body waits for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from signal import SIGKILL
from typing import Any
from uuid import uuid4

import redis
from celery import Celery
from celery import signals as celery_signals
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from celery_stepped import Stepped, signals
from celery_stepped.messages import Message
from tests.isolation import delete_matching, prefix_pattern
from tests.models import Car

ENV_BROKER = "STEPPED_TEST_BROKER_URL"
ENV_LANES = "STEPPED_TEST_LANES_URL"
ENV_DATABASE = "STEPPED_TEST_DATABASE_URL"
ENV_PROBE = "STEPPED_TEST_PROBE_URL"
#: The cluster's name: its lanes' namespace and the start of its broker and probe keys.
ENV_NAME = "STEPPED_TEST_NAME"
#: Seconds before Redis restores an unacknowledged message (the redelivery tests).
ENV_VISIBILITY = "STEPPED_TEST_VISIBILITY_TIMEOUT"
#: "1": publish every internal message twice (the duplicate delivery tests).
ENV_DUPLICATE = "STEPPED_TEST_DUPLICATE"
#: A message kind: the first process about to publish one is killed (SIGKILL) after its
#: transaction committed (the outbox tests); the outbox is swept every second.
ENV_CRASH = "STEPPED_TEST_CRASH_BEFORE_SENDING"


#: An action name: beginning it raises a store error (OperationalError), always.
ENV_STORE_DOWN = "STEPPED_TEST_STORE_DOWN_FOR"


def store_down_for(stepped: Stepped, name: str) -> None:
    """Make Stepped's own store fail whenever an action called ``name`` begins."""
    performer = stepped.core.performer
    begin, begin_and_run = performer.begin, performer.begin_and_run

    def failing_begin(action_id: int, delivery: Any) -> Any:
        if stepped.get_action(action_id).name == name:
            raise OperationalError("UPDATE stepped_actions", {}, Exception("database is down"))
        return begin(action_id, delivery)

    def failing_fresh_begin(fresh: Any, delivery: Any) -> Any:
        # An action its start created begins in its first step (beginning.Fresh).
        if fresh.action.name == name:
            raise OperationalError("UPDATE stepped_actions", {}, Exception("database is down"))
        return begin_and_run(fresh, delivery)

    performer.begin = failing_begin  # type: ignore[method-assign]
    performer.begin_and_run = failing_fresh_begin  # type: ignore[method-assign]


def crash_before_sending(stepped: Stepped, probe: Probe, kind: str) -> None:
    """Kill this process, once across all workers, just before it publishes ``kind``."""
    broker = stepped.outboxes.broker
    send = broker.send

    def send_or_die(messages: Sequence[Message]) -> None:
        if any(m.kind == kind for m in messages) and probe.redis.set(
            f"{probe.prefix}crashed", os.getpid(), nx=True
        ):
            os.kill(os.getpid(), SIGKILL)
        send(messages)

    broker.send = send_or_die  # type: ignore[method-assign]


#: A Redis result backend URL (the canvas tests).
ENV_BACKEND = "STEPPED_TEST_BACKEND_URL"


class Probe:
    """Counters and flags in Redis, shared by the test process and every worker.

    Every key starts with ``prefix``; :meth:`flush` deletes those keys and no other.
    """

    def __init__(self, url: str, prefix: str) -> None:
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.prefix = prefix
        self.counts_key = f"{prefix}counts"
        self.content_key = f"{prefix}content-types"
        self.pids_key = f"{prefix}pids"

    def bump(self, field: str, amount: int = 1) -> None:
        """Add ``amount`` to the counter ``field``."""
        self.redis.hincrby(self.counts_key, field, amount)

    def counts(self, prefix: str = "") -> dict[str, int]:
        """Every counter whose name starts with ``prefix``."""
        counts = self.redis.hgetall(self.counts_key)
        return {k: int(v) for k, v in counts.items() if k.startswith(prefix)}

    def count(self, field: str) -> int:
        """One counter (0 when never bumped)."""
        return int(self.redis.hget(self.counts_key, field) or 0)

    def content_types(self) -> dict[str, int]:
        """How many ``stepped.*`` messages each content type carried."""
        return {k: int(v) for k, v in self.redis.hgetall(self.content_key).items()}

    def pids(self) -> set[int]:
        """The processes that recorded themselves in :attr:`pids_key`."""
        return {int(pid) for pid in self.redis.smembers(self.pids_key)}

    def release(self, name: str) -> None:
        """Let the body blocked on ``name`` go on."""
        self.redis.set(f"{self.prefix}release:{name}", 1)

    def entered(self, name: str) -> int | None:
        """The pid of the process that entered the block ``name`` most recently."""
        pid = self.redis.get(f"{self.prefix}entered:{name}")
        return None if pid is None else int(pid)

    def block(self, name: str, limit: float = 90) -> None:
        """In a step body: record this pid, then wait until ``release(name)``."""
        self.bump(f"entered:{name}")  # first: a test that sees the pid sees the count
        self.redis.set(f"{self.prefix}entered:{name}", os.getpid())
        deadline = time.monotonic() + limit
        while not self.redis.exists(f"{self.prefix}release:{name}"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"block {name!r} was never released")
            time.sleep(0.05)

    def flush(self) -> None:
        """Forget everything (the probe's own keys only)."""
        delete_matching(self.redis, prefix_pattern(self.prefix))


def append(step: Any, car: Car, token: str) -> None:
    """Append ``token;`` to the car's log with one atomic SQL statement."""
    step.session.execute(
        update(Car).where(Car.id == car.id).values(log=Car.log + f"{token};"),
        execution_options={"synchronize_session": False},
    )


def honk(step: Any, car: Car) -> None:
    """Add one to the car's honks with one atomic SQL statement."""
    step.session.execute(
        update(Car).where(Car.id == car.id).values(honks=Car.honks + 1),
        execution_options={"synchronize_session": False},
    )


def define_actions(stepped: Stepped, probe: Probe) -> None:
    """Every action the integration tests run, on :class:`tests.models.Car`."""
    app = stepped.app

    # -- a three-level tree --------------------------------------------------------------
    tree_root = app.stepped_action("tree_root", actor=Car)

    @tree_root.step
    def tree_fan(step: Any, car: Car, width: int) -> None:
        for m in range(width):
            step.do("tree_mid", m)

    @tree_root.step
    def tree_close(step: Any, car: Car, width: int) -> None:
        append(step, car, "root")

    tree_mid = app.stepped_action("tree_mid", actor=Car, concurrency_key=_key("mid"))

    @tree_mid.step
    def mid_fan(step: Any, car: Car, m: int) -> None:
        step.do("tree_leaf", m, 0)
        step.do("tree_leaf", m, 1)

    @tree_mid.step
    def mid_close(step: Any, car: Car, m: int) -> None:
        append(step, car, f"m{m}")

    tree_leaf = app.stepped_action("tree_leaf", actor=Car, concurrency_key=_key("leaf"))

    @tree_leaf.step
    def leaf_body(step: Any, car: Car, m: int, n: int) -> None:
        probe.bump(f"ran:leaf{m}.{n}")
        append(step, car, f"l{m}.{n}")

    # -- fan-out: one step, many children ---------------------------------------------------
    fan_root = app.stepped_action("fan_root", actor=Car)

    @fan_root.step
    def fan_out(step: Any, car: Car, count: int) -> None:
        for i in range(count):
            step.do("fan_leaf", i)

    @fan_root.step
    def fan_in(step: Any, car: Car, count: int) -> None:
        append(step, car, "fanned")

    fan_leaf = app.stepped_action("fan_leaf", actor=Car, concurrency_key=_key("fan"))

    @fan_leaf.step
    def fan_leaf_body(step: Any, car: Car, i: int) -> None:
        probe.redis.sadd(probe.pids_key, os.getpid())
        honk(step, car)

    # -- a lane: one performing, the newest pending supersedes ------------------------------
    lane_job = app.stepped_action(
        "lane_job", actor=Car, outbound=True, concurrency_key=lambda car, label: ["lane", car.id]
    )

    @lane_job.step
    def lane_job_body(step: Any, car: Car, label: str) -> None:
        append(step, car, f"lane-{label}")

    lane_parent = app.stepped_action("lane_parent", actor=Car, concurrency_key=_key("parent"))

    @lane_parent.step
    def lane_parent_body(step: Any, car: Car, label: str) -> None:
        step.do("lane_job", label)

    # -- checksum sharing --------------------------------------------------------------------
    shared_job = app.stepped_action(
        "shared_job",
        actor=Car,
        outbound=True,
        checksum=lambda car, version: {"version": version},
        concurrency_key=lambda car, version: ["shared", car.id],
    )

    @shared_job.step
    def shared_job_body(step: Any, car: Car, version: int) -> None:
        append(step, car, f"shared-{version}")

    shared_parent = app.stepped_action("shared_parent", actor=Car, concurrency_key=_key("sharer"))

    @shared_parent.step
    def shared_parent_body(step: Any, car: Car, version: int, who: str) -> None:
        step.do("shared_job", version)

    # -- outbound and job-backed children ----------------------------------------------------
    @app.task(name="tests.integration.tow", serializer="json", acks_late=True, shared=False)
    def tow(action_id: int) -> None:
        action = stepped.get_action(action_id)
        with stepped.session() as session:
            session.execute(
                update(Car)
                .where(Car.id == int(action.actor_id))
                .values(log=Car.log + f"towed-{action.arguments[0]};")
            )
        stepped.complete(action)

    app.stepped_action("towing", actor=Car, job=tow)
    outbound_child = app.stepped_action("outbound_child", actor=Car, outbound=True)

    @outbound_child.step
    def outbound_child_body(step: Any, car: Car) -> None:
        append(step, car, "outbound-sent")

    outbound_root = app.stepped_action("outbound_root", actor=Car)

    @outbound_root.step
    def outbound_out(step: Any, car: Car) -> None:
        step.do("outbound_child")
        step.do("towing", "to-garage")
        step.wait(0.2)

    @outbound_root.step
    def outbound_in(step: Any, car: Car) -> None:
        append(step, car, "outbound-done")

    # -- a one-second wait -------------------------------------------------------------------
    nap = app.stepped_action("nap", actor=Car)

    @nap.step
    def nap_wait(step: Any, car: Car) -> None:
        step.wait(1)

    @nap.step
    def nap_woke(step: Any, car: Car) -> None:
        append(step, car, "woke")

    # -- a timeout ---------------------------------------------------------------------------
    stuck = app.stepped_action("stuck", actor=Car, outbound=True, timeout=1)

    @stuck.step
    def stuck_body(step: Any, car: Car) -> None:
        """Sends nothing and is never completed: only the timeout ends it."""

    timeout_root = app.stepped_action("timeout_root", actor=Car)

    @timeout_root.step
    def timeout_out(step: Any, car: Car) -> None:
        step.do("stuck")
        step.do("tree_leaf", 9, 9)

    @timeout_root.step
    def timeout_never(step: Any, car: Car) -> None:
        append(step, car, "never")

    # -- a failure deep in the tree ----------------------------------------------------------
    fail_root = app.stepped_action("fail_root", actor=Car)

    @fail_root.step
    def fail_out(step: Any, car: Car) -> None:
        step.do("fail_mid", 0)
        step.do("fail_mid", 1)

    @fail_root.step
    def fail_never(step: Any, car: Car) -> None:
        append(step, car, "never")

    fail_mid = app.stepped_action("fail_mid", actor=Car, concurrency_key=_key("fail-mid"))

    @fail_mid.step
    def fail_mid_out(step: Any, car: Car, m: int) -> None:
        step.do("fail_leaf", m, 0)
        step.do("fail_leaf", m, 1)

    @fail_mid.step
    def fail_mid_in(step: Any, car: Car, m: int) -> None:
        append(step, car, f"fm{m}")

    fail_leaf = app.stepped_action("fail_leaf", actor=Car, concurrency_key=_key("fail-leaf"))

    @fail_leaf.step
    def fail_leaf_body(step: Any, car: Car, m: int, n: int) -> None:
        append(step, car, f"fl{m}.{n}")
        if (m, n) == (1, 1):
            raise RuntimeError("a failure deep in the tree")

    # -- bodies that block until the test releases them (SQLite locks, redelivery) ----------
    blocking_root = app.stepped_action("blocking_root", actor=Car)

    @blocking_root.step
    def blocking_out(step: Any, car: Car, count: int) -> None:
        step.do("blocker", "body")
        for i in range(count):
            step.do("fan_leaf", i)

    @blocking_root.step
    def blocking_in(step: Any, car: Car, count: int) -> None:
        probe.bump("ran:blocking-root-2")
        probe.block("root-2")
        append(step, car, "root-2")

    @blocking_root.step
    def blocking_last(step: Any, car: Car, count: int) -> None:
        append(step, car, "root-3")

    blocker = app.stepped_action("blocker", actor=Car)

    @blocker.step
    def blocker_first(step: Any, car: Car, name: str) -> None:
        probe.bump("ran:blocker-1")
        append(step, car, "blocker-1")

    @blocker.step
    def blocker_second(step: Any, car: Car, name: str) -> None:
        probe.bump("ran:blocker-2")
        probe.block(name)
        append(step, car, "blocker-2")

    # -- a store that keeps failing for one action (the store error tests) -------------------
    store_down = app.stepped_action("store_down", actor=Car, concurrency_key=_key("down"))

    @store_down.step
    def store_down_body(step: Any, car: Car) -> None:
        append(step, car, "store-down-ran")

    store_parent = app.stepped_action("store_parent", actor=Car)

    @store_parent.step
    def store_parent_body(step: Any, car: Car) -> None:
        step.do("store_down")


# -- issue 13: stepped actions and plain Celery canvas --------------------------------------


def define_canvas(stepped: Stepped, probe: Probe) -> None:
    """Actions and plain tasks of ``test_canvas.py`` (chains, chords, task members, routing)."""
    app = stepped.app

    def task(name: str, **options: Any) -> Any:
        return app.task(name=name, serializer="json", acks_late=True, shared=False, **options)

    canvas_drive = app.stepped_action("canvas_drive", actor=Car, concurrency_key=_key("cd"))

    @canvas_drive.step
    def canvas_drive_body(step: Any, car: Car, token: str) -> None:
        append(step, car, f"drive-{token}")

    canvas_fail = app.stepped_action("canvas_fail", actor=Car)

    @canvas_fail.step
    def canvas_fail_body(step: Any, car: Car) -> None:
        append(step, car, "fail")
        step.status = "failed"

    canvas_cancelled = app.stepped_action("canvas_cancelled", actor=Car)

    @canvas_cancelled.before
    def canvas_cancel(action: Any, car: Car) -> None:
        action.cancel()

    canvas_outbound = app.stepped_action("canvas_outbound", actor=Car, outbound=True)

    @canvas_outbound.step
    def canvas_outbound_body(step: Any, car: Car) -> None:
        append(step, car, "outbound")

    @task("tests.canvas.note")
    def note(previous: Any, car_id: int, token: str) -> str:
        with stepped.session() as session:
            session.execute(
                update(Car).where(Car.id == car_id).values(log=Car.log + f"{token}-{previous};")
            )
        return f"noted-{token}"

    @task("tests.canvas.collect")
    def collect(results: list[Any]) -> list[Any]:
        probe.bump("collected")
        return sorted(results)

    @task("tests.canvas.errback")
    def errback(task_id: str) -> None:
        probe.bump(f"errback:{task_id}")

    define_members(stepped, probe, task)


def define_members(stepped: Stepped, probe: Probe, task: Any) -> None:
    """Plain tasks as members of a step's join (``step.task``) and a routed step body."""
    app = stepped.app

    def note(car_id: int, token: str) -> None:
        with stepped.session() as session:
            session.execute(update(Car).where(Car.id == car_id).values(log=Car.log + f"{token};"))

    @task("tests.canvas.mail")
    def mail(car_id: int, token: str, fail: bool = False) -> str:
        probe.bump(f"ran:{token}")
        if fail:
            raise ValueError(f"{token} bounced")
        note(car_id, token)
        return token

    @task("tests.canvas.blocking_member", reject_on_worker_lost=True)
    def blocking_member(car_id: int, name: str) -> str:
        probe.bump(f"ran:{name}")
        probe.block(name)
        note(car_id, name)
        return name

    members_three = app.stepped_action("members_three", actor=Car)

    @members_three.step
    def three_out(step: Any, car: Car) -> None:
        for i in (1, 2, 3):
            step.task(mail.s(car.id, f"m{i}", i == 2))

    @members_three.step
    def three_never(step: Any, car: Car) -> None:
        append(step, car, "never")

    members_late = app.stepped_action("members_late", actor=Car)

    @members_late.step
    def late_out(step: Any, car: Car) -> None:
        step.task(mail.s(car.id, "expired").set(expires="2000-01-01T00:00:00+00:00"))
        step.task(blocking_member.s(car.id, "slow"), timeout=0.5)
        step.task(mail.s(car.id, "fine"))

    define_routed(stepped, probe, mail)

    members_redelivered = app.stepped_action("members_redelivered", actor=Car)

    @members_redelivered.step
    def redelivered_out(step: Any, car: Car) -> None:
        step.task(blocking_member.s(car.id, "member"))
        step.task(mail.s(car.id, "quick"))

    @members_redelivered.step
    def redelivered_after(step: Any, car: Car) -> None:
        probe.bump("ran:members-after")
        probe.block("members-after")
        append(step, car, "after")


def define_routed(stepped: Stepped, probe: Probe, mail: Any) -> None:
    """An action on the ``body`` queue whose members run on the default queues."""
    app = stepped.app
    routed = app.stepped_action("routed", actor=Car, queue="body")

    def seen(name: str) -> None:
        probe.redis.sadd(f"{probe.prefix}pids:{name}", os.getpid())

    @routed.step
    def routed_out(step: Any, car: Car) -> None:
        seen("routed")
        step.do("routed_child")
        step.task(mail.s(car.id, "routed-mail"))

    @routed.step
    def routed_wait(step: Any, car: Car) -> None:
        seen("routed")
        step.wait(0.2)

    @routed.step
    def routed_last(step: Any, car: Car) -> None:
        seen("routed")
        append(step, car, "routed-last")

    routed_child = app.stepped_action("routed_child", actor=Car)

    @routed_child.step
    def routed_child_body(step: Any, car: Car) -> None:
        seen("routed-child")
        append(step, car, "child")


def _key(prefix: str) -> Any:
    """A concurrency key of its own per argument list, so siblings never share a lane."""

    def key(car: Car, *args: Any) -> list[Any]:
        return [prefix, car.id, *args]

    return key


def connect_probe(stepped: Stepped, probe: Probe) -> None:
    """Count Stepped's signals (in whichever process sends them) in the probe."""

    def on_step_completed(sender: Any, step_id: int, status: str, **_: Any) -> None:
        probe.bump(f"step_completed:{step_id}")
        probe.bump(f"step_completed_status:{step_id}:{status}")

    def on_action_completed(sender: Any, action_id: int, status: str, **_: Any) -> None:
        probe.bump(f"action_completed:{action_id}")
        probe.bump(f"action_completed_status:{action_id}:{status}")

    def on_action_started(sender: Any, action_id: int, **_: Any) -> None:
        probe.bump(f"action_started:{action_id}")

    for signal, receiver in (
        (signals.step_completed, on_step_completed),
        (signals.action_completed, on_action_completed),
        (signals.action_started, on_action_started),
    ):
        signal.connect(receiver, sender=stepped, weak=False)


def send_everything_twice(stepped: Stepped) -> None:
    """Publish each internal message twice, under two task ids (a user's job once).

    Two deliveries of one message, as a broker's at-least-once delivery may give, run
    concurrently on different processes or one after the other.
    """
    broker = stepped.outboxes.broker
    send = broker.send

    def twice(messages: Sequence[Message]) -> None:
        copies = [replace(m, task_id=str(uuid4())) for m in messages if m.kind != "job"]
        send([*messages, *copies])

    broker.send = twice  # type: ignore[method-assign]


def build(
    broker_url: str,
    lanes_url: str,
    database_url: str,
    probe_url: str,
    name: str,
    visibility_timeout: float | None = None,
    duplicate: bool = False,
    backend_url: str | None = None,
) -> tuple[Celery, Stepped, Probe]:
    """The app, its Stepped instance and the probe, with every test action defined.

    ``name`` is the lanes' namespace; broker keys start with ``<name>:broker:`` (kombu's
    ``global_keyprefix``), probe keys with ``<name>:probe:``. The app's default
    serializer is pickle and the worker accepts JSON only, so an internal message that
    did not force JSON would be refused (and counted).
    """
    app = Celery(
        "stepped_integration", broker=broker_url, backend=backend_url, set_as_current=False
    )
    app.conf.update(
        stepped_outbox_sweep_after=float(os.environ.get("STEPPED_TEST_SWEEP_AFTER", 60)),
        stepped_outbox_sweep_every=float(os.environ.get("STEPPED_TEST_SWEEP_EVERY", 30)),
        stepped_store_retries=int(os.environ.get("STEPPED_TEST_STORE_RETRIES", 8)),
        stepped_store_retry_backoff=float(os.environ.get("STEPPED_TEST_STORE_BACKOFF", 1)),
        task_serializer="pickle",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    transport: dict[str, Any] = {"global_keyprefix": f"{name}:broker:"}
    if visibility_timeout is not None:
        transport.update(
            visibility_timeout=visibility_timeout,
            unacked_restore_interval=1,
            unacked_restore_throttle=1,
        )
    app.conf.broker_transport_options = transport
    if backend_url is not None:
        app.conf.result_backend_transport_options = {"global_keyprefix": f"{name}:backend:"}
    stepped = Stepped(app, database_url=database_url, redis_url=lanes_url, namespace=name)
    probe = Probe(probe_url, f"{name}:probe:")
    define_actions(stepped, probe)
    define_canvas(stepped, probe)
    connect_probe(stepped, probe)
    if duplicate:
        send_everything_twice(stepped)
    return app, stepped, probe


def _from_env() -> Celery | None:
    if ENV_BROKER not in os.environ:
        return None
    visibility = os.environ.get(ENV_VISIBILITY)
    app, stepped, probe = build(
        os.environ[ENV_BROKER],
        os.environ[ENV_LANES],
        os.environ[ENV_DATABASE],
        os.environ[ENV_PROBE],
        os.environ[ENV_NAME],
        float(visibility) if visibility else None,
        os.environ.get(ENV_DUPLICATE) == "1",
        os.environ.get(ENV_BACKEND),
    )
    if os.environ.get(ENV_CRASH):
        crash_before_sending(stepped, probe, os.environ[ENV_CRASH])
    if os.environ.get(ENV_STORE_DOWN):
        store_down_for(stepped, os.environ[ENV_STORE_DOWN])

    def record_content_type(sender: Any = None, request: Any = None, **_: Any) -> None:
        if request is not None and str(request.name).startswith("stepped."):
            probe.redis.hincrby(probe.content_key, str(request.content_type), 1)

    celery_signals.task_received.connect(record_content_type, weak=False)
    return app


#: The worker's app (``celery -A tests.integration.worker_app``); None in the test process.
app = _from_env()
