"""``celery_stepped.contrib.flask``: the pages as JSON and HTML, filters, pagination, 4xx
answers and the opt-in POSTs, over Flask's test client, on trees a real worker ran."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from celery_stepped import Stepped
from celery_stepped.contrib.flask import stepped_blueprint
from celery_stepped.views import action_tree
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration

JSON = {"Accept": "application/json"}
TOKEN = "s3cret-token"


def client(stepped: Stepped, config: dict[str, Any] | None = None, **options: Any) -> FlaskClient:
    """A test client of a Flask app with the blueprint registered under /stepped."""
    app = Flask(__name__)
    app.config.update(config or {})
    app.register_blueprint(stepped_blueprint(stepped, **options))
    return app.test_client()


def is_json_error(response: TestResponse, status: int) -> bool:
    """The response is a JSON error with this status."""
    body = response.get_json(silent=True)
    return (
        response.status_code == status
        and response.mimetype == "application/json"
        and isinstance(body, dict)
        and body["status"] == status
        and bool(body["error"])
    )


def is_html_error(response: TestResponse, status: int) -> bool:
    """The response is an HTML error page with this status."""
    text = response.get_data(as_text=True)
    return response.status_code == status and response.mimetype == "text/html" and "<h1>" in text


def lane_jobs(it: Cluster, count: int) -> tuple[Any, list[int]]:
    """``count`` outbound ``lane_job`` roots on one car: the first performs and waits to be
    completed, the others queue behind it in the lane ``lane/<car id>``."""
    car = it.make_car()
    first = it.later("lane_job", car, "a")
    it.wait_ready(first)
    ids = [first]
    for label in "bcdefg"[: count - 1]:
        ids.append(it.later("lane_job", car, label))
        it.wait_status(ids[-1], "pending")
    return car, ids


def test_a_tree_as_json_and_as_a_page(it: Cluster) -> None:
    root = it.wait_final(it.later("fail_root", it.make_car()))
    http = client(it.stepped)
    by_suffix = http.get(f"/stepped/actions/{root.id}.json")
    by_accept = http.get(f"/stepped/actions/{root.id}", headers=JSON)
    assert by_suffix.status_code == by_accept.status_code == 200
    assert by_suffix.get_json() == by_accept.get_json() == action_tree(it.stepped, root.id)
    assert by_accept.headers["Vary"] == "Accept"
    assert by_accept.headers["Cache-Control"] == "no-store"

    page = http.get(f"/stepped/actions/{root.id}")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert f'id="action-{root.id}" data-action-id="{root.id}" data-status="failed"' in html
    assert "step 1/2" in html and "fail_out" in html  # 1-based, with the step's name
    assert "RuntimeError" in html and "a failure deep in the tree" in html
    assert 'data-open="no"' in html  # final: the page will not poll
    assert "complete or cancel" not in html  # read-only by default
    assert http.get("/stepped/static/stepped.js").status_code == 200


def test_the_index_filters_paginates_and_counts(it: Cluster) -> None:
    one, two = it.make_car(), it.make_car()
    succeeded = [it.wait_final(it.later("tree_root", one, 1)).id for _ in range(3)]
    failed = it.wait_final(it.later("fail_root", two)).id
    http = client(it.stepped)

    everything = http.get("/stepped/actions.json").get_json()
    assert [row["id"] for row in everything["items"]] == [failed, *reversed(succeeded)]
    assert everything["total"] == 4 and everything["pages"] == 1
    assert everything["counts"]["succeeded"] == 3 and everything["counts"]["failed"] == 1

    only_failed = http.get("/stepped/actions?status=failed", headers=JSON).get_json()
    assert [row["id"] for row in only_failed["items"]] == [failed]
    assert only_failed["counts"]["succeeded"] == 3  # counts ignore the status filter
    by_name = http.get("/stepped/actions.json?name=tree_root").get_json()
    assert by_name["total"] == 3 and by_name["counts"]["failed"] == 0
    by_actor = http.get(f"/stepped/actions.json?actor=Car/{two.id}").get_json()
    assert [row["id"] for row in by_actor["items"]] == [failed]
    assert http.get("/stepped/actions.json?actor=Car").get_json()["total"] == 4

    second = http.get("/stepped/actions.json?per_page=3&page=2").get_json()
    assert second["page"] == 2 and second["pages"] == 2
    assert [row["id"] for row in second["items"]] == [succeeded[0]]

    page = http.get("/stepped/actions?per_page=3&name=&actor=").get_data(as_text=True)
    assert "page 1 of 2" in page and "older" in page
    assert 'href="/stepped/actions?page=2&amp;per_page=3"' in page
    assert f'data-action-id="{failed}"' in page and ">failed</span>" in page
    assert http.get("/stepped/").headers["Location"] == "/stepped/actions"


def test_lanes_and_a_superseded_action(it: Cluster) -> None:
    car, (current, superseded, pending) = lane_jobs(it, 3)
    it.wait_status(superseded, "superseded")
    http = client(it.stepped)

    lanes = http.get("/stepped/lanes.json").get_json()["lanes"]
    lane = next(lane for lane in lanes if lane["key"] == f"lane/{car.id}")
    assert lane["current"]["id"] == current and lane["current"]["status"] == "performing"
    assert [entry["id"] for entry in lane["pending"]] == [pending]
    assert lane["pending"][0]["age_seconds"] >= 0

    html = http.get("/stepped/lanes").get_data(as_text=True)
    assert f'href="/stepped/actions/{pending}">#{pending}</a>' in html and "pending" in html
    tree = http.get(f"/stepped/actions/{superseded}").get_data(as_text=True)
    assert f'superseded by <a href="/stepped/actions/{pending}">#{pending}</a>' in tree
    assert 'data-open="no"' in tree
    assert 'data-open="yes"' in http.get(f"/stepped/actions/{current}").get_data(as_text=True)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/stepped/actions/999999", 404),
        ("GET", "/stepped/actions/abc", 404),
        ("GET", "/stepped/actions/99999999999999999999", 404),
        ("GET", "/stepped/actions/0", 404),
        ("GET", "/stepped/actions?status=bogus", 400),
        ("GET", "/stepped/actions?page=0", 400),
        ("GET", "/stepped/actions?page=two", 400),
        ("GET", "/stepped/actions?page=-1", 400),
        ("GET", "/stepped/actions?per_page=0", 400),
        ("GET", "/stepped/actions?per_page=100000", 400),
        ("GET", "/stepped/actions?page=99999999999", 400),
        ("GET", "/stepped/actions?name=%00", 400),
        ("GET", "/stepped/actions?actor=Car/", 400),
        ("GET", "/stepped/actions?actor=/7", 400),
        ("GET", "/stepped/nowhere/at/all", 404),
        ("GET", "/stepped/actions/1/complete", 405),
        ("GET", "/stepped/actions/1/explode", 404),
        ("POST", "/stepped/actions", 405),
        ("DELETE", "/stepped/lanes", 405),
    ],
)
def test_bad_input_answers_4xx_in_the_format_asked_for(
    it: Cluster, method: str, path: str, status: int
) -> None:
    http = client(it.stepped)
    assert is_json_error(http.open(path, method=method, headers=JSON), status)
    assert is_html_error(http.open(path, method=method), status)
    if "?" not in path and status == 404:  # the .json suffix asks for JSON too
        assert is_json_error(http.get(f"{path}.json"), status)


def test_posts_are_refused_without_the_opt_in(it: Cluster) -> None:
    _, (action,) = lane_jobs(it, 1)
    http = client(it.stepped, {"STEPPED_ACTION_TOKEN": TOKEN})
    cancel = f"/stepped/actions/{action}/cancel"
    refused = http.post(cancel, headers={**JSON, "X-Stepped-Token": TOKEN})
    assert is_json_error(refused, 403) and "allow_actions=True" in refused.get_json()["error"]
    assert is_html_error(http.post(cancel, data={"token": TOKEN}), 403)
    assert it.stepped.get_action(action).status == "performing"


def test_posts_need_the_token(it: Cluster) -> None:
    _, (outbound, queued) = lane_jobs(it, 2)
    unset = client(it.stepped, allow_actions=True)
    nothing = unset.post(f"/stepped/actions/{outbound}/complete", headers=JSON)
    assert is_json_error(nothing, 403) and "no action token" in nothing.get_json()["error"]

    http = client(it.stepped, {"STEPPED_ACTION_TOKEN": TOKEN}, allow_actions=True)
    complete = f"/stepped/actions/{outbound}/complete"
    assert is_json_error(http.post(complete, headers=JSON), 403)
    assert is_json_error(http.post(complete, headers={**JSON, "X-Stepped-Token": "guess"}), 403)
    assert is_html_error(http.post(complete, data={"token": "guess"}), 403)
    good = {**JSON, "X-Stepped-Token": TOKEN}
    assert is_json_error(http.post(complete, headers=good, data={"status": "done"}), 400)
    assert is_json_error(http.post(f"/stepped/actions/{queued}/complete", headers=good), 409)
    assert is_json_error(http.post("/stepped/actions/999999/cancel", headers=good), 404)
    assert it.stepped.get_action(outbound).status == "performing"

    done = http.post(complete, headers=good, data={"status": "succeeded"})
    assert done.status_code == 200
    assert done.get_json() == {"id": outbound, "name": "lane_job", "status": "succeeded"}
    assert is_json_error(http.post(complete, headers=good), 409)  # already final
    it.wait_ready(queued)  # the lane moved on: the queued one performs now

    bad_back = http.post(f"/stepped/actions/{queued}/cancel", data={"token": TOKEN, "back": "x"})
    assert is_html_error(bad_back, 404)
    assert it.stepped.get_action(queued).status == "performing"  # checked before changing
    form = {"token": TOKEN, "back": str(outbound)}
    cancelled = http.post(f"/stepped/actions/{queued}/cancel", data=form)
    assert cancelled.status_code == 303
    assert cancelled.headers["Location"] == f"/stepped/actions/{outbound}"
    assert it.stepped.get_action(queued).status == "cancelled"
    assert http.get("/stepped/lanes.json").get_json()["lanes"] == []


def test_a_token_given_to_the_blueprint(it: Cluster) -> None:
    _, (action,) = lane_jobs(it, 1)
    http = client(
        it.stepped, {"STEPPED_ACTION_TOKEN": "not this one"}, allow_actions=True, token=TOKEN
    )
    cancel = f"/stepped/actions/{action}/cancel"
    assert is_json_error(
        http.post(cancel, headers={**JSON, "X-Stepped-Token": "not this one"}), 403
    )
    answer = http.post(cancel, json={}, headers={"X-Stepped-Token": TOKEN})
    assert answer.status_code == 200 and answer.get_json()["status"] == "cancelled"
    page = http.get(f"/stepped/actions/{action}").get_data(as_text=True)
    assert "cancelled" in page and "complete or cancel" not in page  # nothing left to operate


def test_a_shared_action_links_its_other_parents(it: Cluster) -> None:
    car = it.make_car()
    first = it.later("shared_parent", car, 1, "first")
    (shared,) = it.wait_named("shared_job", 1, "performing")
    it.wait_ready(shared.id)
    second = it.later("shared_parent", car, 1, "second")  # same checksum: waits on it too
    http = client(it.stepped)

    def shared_in_second() -> bool:
        steps = http.get(f"/stepped/actions/{second}.json").get_json()["steps"]
        members = steps[0]["members"] if steps else []
        return any(m["action"] and m["action"]["id"] == shared.id for m in members)

    it.wait_for("the second parent to wait on the shared action", shared_in_second)
    page = http.get(f"/stepped/actions/{second}").get_data(as_text=True)
    assert f'also awaited by <a href="/stepped/actions/{first}">#{first}</a>' in page
    page = http.get(f"/stepped/actions/{first}").get_data(as_text=True)
    assert f'also awaited by <a href="/stepped/actions/{second}">#{second}</a>' in page
