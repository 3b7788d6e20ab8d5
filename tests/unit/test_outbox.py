"""The transactional outbox: messages are staged with the state change, sent after the
commit, and sent again by a sweep when a crash came in between."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from kombu.transport.redis import PublishBatch
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import func, select

from celery_stepped import Stepped
from celery_stepped.messages import Message, advance_message
from celery_stepped.models import Action, OutboxEntry
from celery_stepped.testing import perform_stepped_actions
from tests.conftest import load_car
from tests.models import Car


class Crash(BaseException):
    """The process dies (kill -9) at this point."""


def entries(stepped: Stepped) -> int:
    with stepped.session() as s:
        return int(s.scalar(select(func.count()).select_from(OutboxEntry)) or 0)


def define(stepped: Stepped) -> Any:
    app = stepped.app

    @app.stepped_action
    def honk(car: Car) -> None:
        car.honk()

    @app.stepped_action
    def tour(step: Any, car: Car) -> None:
        step.wait(30)
        step.do(honk)

    return tour


def test_a_finished_tree_leaves_no_entry(stepped: Stepped, car: Car) -> None:
    tour = define(stepped)
    with stepped.capture():
        root = tour.now(car)
        assert entries(stepped) == 0  # its wait and child were sent: entries dropped
        perform_stepped_actions(stepped)
    assert stepped.get_action(root.id).status == "succeeded"
    assert entries(stepped) == 0


def test_a_crash_between_commit_and_send_is_swept(
    stepped: Stepped, car: Car, monkeypatch: pytest.MonkeyPatch
) -> None:
    tour = define(stepped)
    with stepped.capture() as jobs:
        send = stepped.outboxes.send

        def die(messages: Any) -> None:
            if messages:
                raise Crash
            send(messages)

        monkeypatch.setattr(stepped.outboxes, "send", die)
        with pytest.raises(Crash):
            tour.now(car)  # the step committed its wait and child, then the process died
        monkeypatch.setattr(stepped.outboxes, "send", send)
        assert jobs.enqueued == []
        assert entries(stepped) == 2
        assert stepped.sweep_outbox(older_than=3600) == 0  # not old enough: maybe in flight
        assert stepped.sweep_outbox(older_than=0) == 2
        assert sorted(j.kind for j in jobs.enqueued) == ["action", "wait"]
        assert entries(stepped) == 0
        perform_stepped_actions(stepped)
    with stepped.session() as s:
        statuses = s.execute(select(Action.name, Action.status).order_by(Action.id)).all()
    assert [tuple(row) for row in statuses] == [("tour", "succeeded"), ("honk", "succeeded")]
    assert load_car(stepped, car.id).honks == 1


def crash(*_: Any) -> None:
    raise Crash


def test_later_is_durable_before_the_broker_has_it(
    stepped: Stepped, car: Car, monkeypatch: pytest.MonkeyPatch
) -> None:
    tour = define(stepped)
    with stepped.capture() as jobs:
        monkeypatch.setattr(stepped.outboxes, "send_one", crash)
        with pytest.raises(Crash):
            tour.later(car)  # the broker died before it took the message
        monkeypatch.undo()
        assert entries(stepped) == 1
        assert stepped.sweep_outbox(older_than=0) == 1
        assert [(j.kind, j.name) for j in jobs.enqueued] == [("action", "tour")]
        perform_stepped_actions(stepped)
    assert load_car(stepped, car.id).honks == 1
    assert entries(stepped) == 0


def test_a_start_the_broker_had_and_lost_is_sent_again(stepped: Stepped, car: Car) -> None:
    """later()'s entry stays until its start runs: a broker that took the message and
    then lost it with Redis (restarted empty) gets it again from the sweep."""
    tour = define(stepped)
    with stepped.capture() as jobs:
        tour.later(car)
        assert entries(stepped) == 1  # kept while the message is only in the broker
        assert [m.name for m in jobs.take()] == ["tour"]  # the broker lost it
        assert stepped.sweep_outbox(older_than=0) == 1
        perform_stepped_actions(stepped)
        assert entries(stepped) == 0  # the start ran: its entry is gone
        assert stepped.sweep_outbox(older_than=0) == 0
    assert load_car(stepped, car.id).honks == 1
    with stepped.session() as s:
        assert s.scalar(select(func.count()).select_from(Action).where(Action.name == "tour")) == 1


def test_a_kept_start_waiting_in_a_busy_queue_is_not_sent_again(stepped: Stepped, car: Car) -> None:
    """later()'s entry stays until its start runs; while its message waits in the
    broker's queue (a backlog, no worker here) the sweep leaves it: late, not lost. Once
    the queue is empty and the start has still not run, the sweep sends it again."""
    tour = define(stepped)
    result = tour.later(car)  # to the real broker: it waits in the queue
    assert stepped.outboxes.waiting("stepped") == 1
    assert stepped.sweep_outbox(older_than=0) == 0
    assert stepped.outboxes.waiting("stepped") == 1  # no second copy
    assert entries(stepped) == 1
    with stepped.app.connection_for_write() as connection:
        connection.default_channel.queue_purge("stepped")  # the broker loses it
    assert stepped.sweep_outbox(older_than=0) == 1
    assert stepped.outboxes.waiting("stepped") == 1
    assert entries(stepped) == 0
    with stepped.app.connection_for_read() as connection:
        message = connection.default_channel.basic_get("stepped")
    assert message is not None and message.headers["id"] == result.id


def take_all(stepped: Stepped, queue: str) -> list[str]:
    """The ids of the messages ``queue`` holds, in delivery order (taking them)."""
    ids = []
    with stepped.app.connection_for_read() as connection:
        while (message := connection.default_channel.basic_get(queue, no_ack=True)) is not None:
            ids.append(message.headers["id"])
    return ids


def advances(count: int) -> list[Message]:
    return [replace(advance_message(n), task_id=f"advance-{n}") for n in range(count)]


def test_several_messages_reach_the_broker_in_one_pipelined_batch(
    stepped: Stepped, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's chord header (here five messages) goes to Redis in one round trip, in
    order, each once; one message alone is published as before, without a batch."""
    flushed: list[int] = []
    real_flush = PublishBatch.flush

    def counted(batch: PublishBatch) -> None:
        flushed.append(len(batch.pipeline))
        real_flush(batch)

    monkeypatch.setattr(PublishBatch, "flush", counted)
    stepped.outboxes.broker.send(advances(5))
    assert flushed == [5]  # one pipeline of five LPUSHes
    assert take_all(stepped, "stepped") == [f"advance-{n}" for n in range(5)]
    stepped.outboxes.broker.send(advances(1))
    assert flushed == [5]
    assert take_all(stepped, "stepped") == ["advance-0"]


def test_a_batch_whose_delivery_is_uncertain_is_sent_again_one_by_one(
    stepped: Stepped, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis fails the batch's pipeline (a dropped connection): kombu cannot say what
    arrived, so every message is published again on its own; none is lost."""
    failures = []
    real_execute = Pipeline.execute

    def drops(pipeline: Pipeline, *args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(len(pipeline))
            pipeline.reset()
            raise RedisConnectionError("connection dropped")
        return real_execute(pipeline, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "execute", drops)
    stepped.outboxes.broker.send(advances(3))
    assert failures == [3]
    assert take_all(stepped, "stepped") == [f"advance-{n}" for n in range(3)]
