"""Stepped's own store errors are retried a bounded number of times, then the action
fails with the reason in its row and the failure travels up (issue 11, item 11)."""

from __future__ import annotations

import pytest

from tests.integration import worker_app
from tests.integration.conftest import Cluster, make_cluster


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_base: str
) -> Cluster:
    """One worker whose store fails whenever ``store_down`` begins; 2 quick retries."""
    env = {
        worker_app.ENV_STORE_DOWN: "store_down",
        "STEPPED_TEST_STORE_RETRIES": "2",
        "STEPPED_TEST_STORE_BACKOFF": "0.2",
    }
    return make_cluster(request, tmp_path_factory, redis_base, env=env)


def test_a_store_error_that_outlasts_its_retries_fails_the_action_with_its_reason(
    it: Cluster,
) -> None:
    car = it.make_car()
    root = it.later("store_parent", car)
    assert it.wait_final(root).status == "failed"
    (down,) = it.actions("store_down")
    assert down.status == "failed"
    assert down.error is not None
    assert down.error["type"] == "OperationalError"
    assert "gave up after repeated store errors in stepped." in down.error["message"]
    assert it.log_tokens(car.id) == []  # its body never ran
    logs = it.logs()
    assert logs.count("Retry in") == 2  # bounded: two retries, then it gave up
    assert "giving up after 2 retries" in logs
    it.quiet()
    assert it.stepped.lanes.get(f"down/{car.id}") is None
