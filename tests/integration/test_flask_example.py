"""examples/flask_app: orders placed over HTTP run as trees on a real worker."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from celery_stepped.embedded import WorkerProcess
from tests.integration.conftest import SHOP, shop_module


@pytest.fixture(scope="module")
def shop(shop_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The example module (imported once), its tables, and a real worker running its tasks."""
    database = tmp_path_factory.mktemp("shop") / "shop.db"
    env = {"SHOP_REDIS_URL": shop_redis, "SHOP_DATABASE_URL": f"sqlite:///{database}"}
    with shop_module(env) as module:
        worker = WorkerProcess(
            "shop:celery_app", queues=module.QUEUE, cwd=str(SHOP), env=env, concurrency=2
        )
        worker.start()
        try:
            yield module
        finally:
            worker.stop()


def poll(what: str, probe: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_orders_over_http_run_as_trees(shop: ModuleType) -> None:
    client = shop.app.test_client()
    assert client.post("/orders", json={}).status_code == 400

    placed = client.post("/orders", json={"item": "lamp"})
    assert placed.status_code == 202
    order_id = placed.get_json()["order_id"]

    def state() -> dict[str, Any]:
        return client.get(f"/orders/{order_id}").get_json()

    poll("the payment request", lambda: state()["state"] == "awaiting payment")
    lanes = client.get("/lanes").get_json()["lanes"]
    assert any(lane["key"] == f"Order/{order_id}/charge" for lane in lanes)

    paid = client.post(f"/webhooks/payments/{order_id}", json={"status": "succeeded"})
    assert paid.status_code == 200 and paid.get_json()["status"] == "succeeded"
    assert client.post(f"/webhooks/payments/{order_id}", json={}).status_code == 409

    done = poll("the order to ship", lambda: (s := state())["tree"]["completed_at"] and s)
    tree = done["tree"]
    assert done["state"] == "shipped" and tree["status"] == "succeeded"
    assert [step["name"] for step in tree["steps"]] == ["pay", "prepare", "send"]
    prepare = tree["steps"][1]
    assert sorted(m["kind"] for m in prepare["members"]) == ["action", "wait"]
    assert prepare["duration_seconds"] >= 1  # the cool-off wait held the step
    assert client.get("/lanes").get_json()["lanes"] == []


def test_a_failed_payment_fails_the_order(shop: ModuleType) -> None:
    client = shop.app.test_client()
    order_id = client.post("/orders", json={"item": "chair"}).get_json()["order_id"]
    poll(
        "the payment request",
        lambda: client.get(f"/orders/{order_id}").get_json()["state"] == "awaiting payment",
    )
    assert client.post(f"/webhooks/payments/{order_id}", json={"status": "nope"}).status_code == 400
    assert client.post("/webhooks/payments/999", json={}).status_code == 404
    assert (
        client.post(f"/webhooks/payments/{order_id}", json={"status": "failed"}).status_code == 200
    )
    # The failed callback runs after the root's final status commits: wait for its effect.
    order = poll(
        "the order to be cancelled",
        lambda: (s := client.get(f"/orders/{order_id}").get_json())["state"] == "cancelled" and s,
    )
    assert order["tree"]["status"] == "failed"
    assert order["state"] == "cancelled"
    assert [step["status"] for step in order["tree"]["steps"]] == ["failed"]
