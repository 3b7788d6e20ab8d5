"""Malformed and oversized internal messages on a real worker: rejected with a log line,
the worker unharmed (issue 15, item 2)."""

from __future__ import annotations

from tests.integration.conftest import Cluster


def _nested(levels: int) -> list[object]:
    value: list[object] = []
    for _ in range(levels):
        value = [value]
    return value


def test_malformed_messages_are_rejected_and_the_worker_goes_on(it: Cluster) -> None:
    send = it.app.send_task
    send("stepped.start", args=[{"actor": "Car/1"}], queue="stepped", serializer="json")
    send("stepped.resume", args=["12", 3], queue="stepped", serializer="json")
    send("stepped.advance", args=[_nested(500)], queue="stepped", serializer="json")
    it.wait_for("three rejections", lambda: it.logs().count("rejected ") >= 3)
    logs = it.logs()
    assert "nest deeper than 48 levels" in logs
    assert "malformed arguments" in logs
    assert "RecursionError" not in logs
    worker = it.workers[0]
    pids = worker.child_pids()
    assert worker.process is not None and worker.process.poll() is None  # still running
    car = it.make_car()
    assert it.wait_final(it.later("nap", car)).status == "succeeded"  # still serving trees
    assert worker.child_pids() == pids  # and no pool process died on the way
