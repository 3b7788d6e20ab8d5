"""The shop's pages in a real browser: ``examples/flask_app/run.py`` (a worker and the
Flask development server) on real Redis and SQLite, watched in headless Chromium.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it), driven by
Playwright with ``executable_path``; ``STEPPED_CHROMIUM`` names another binary. A
missing browser fails the tests, it does not skip them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from sqlalchemy import select

from celery_stepped.models import Action
from tests.integration.conftest import SHOP, WAIT, shop_module

pytestmark = pytest.mark.integration

TOKEN = "browser-test-token"
#: No connections of Chromium's own: this machine's network is closed.
QUIET_CHROMIUM = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-quic",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class Shop:
    """The running example: its base URL, the in-process ``shop`` module, its log."""

    base: str
    module: ModuleType
    log: Path

    def request(self, method: str, path: str, data: Any = None, **headers: str) -> Any:
        """Send a request; the decoded JSON answer (or the text of an HTML one)."""
        body = None
        if isinstance(data, dict) and headers.get("content-type") == "application/json":
            body = json.dumps(data).encode()
        elif data is not None:
            body = urllib.parse.urlencode(data).encode()
        request = urllib.request.Request(self.base + path, body, headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
            return (
                json.loads(text) if response.headers.get_content_type().endswith("json") else text
            )

    def order(self, item: str) -> int:
        """Place an order over HTTP; its id."""
        answer = self.request(
            "POST", "/orders", {"item": item}, **{"content-type": "application/json"}
        )
        return int(answer["order_id"])

    def state(self, order_id: int) -> dict[str, Any]:
        """``GET /orders/<id>``: the order's state and tree."""
        result: dict[str, Any] = self.request("GET", f"/orders/{order_id}")
        return result

    def pay(self, order_id: int, status: str = "succeeded") -> None:
        """The payment provider's webhook."""
        self.request(
            "POST",
            f"/webhooks/payments/{order_id}",
            {"status": status},
            **{"content-type": "application/json"},
        )

    def awaiting_payment(self, order_id: int) -> dict[str, Any]:
        """Wait until the order's charge asked for the payment; the tree then."""
        return wait_for(
            "the payment request",
            lambda: (s := self.state(order_id))["state"] == "awaiting payment" and s["tree"],
            self,
        )


def wait_for(what: str, probe: Callable[[], Any], shop: Shop) -> Any:
    """Poll ``probe`` until it returns something truthy (deadline: ``WAIT``)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{shop.log.read_text()[-3000:]}")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serving(shop: Shop, process: subprocess.Popen[bytes]) -> bool:
    """True once the app answers; fails at once if run.py exited."""
    if process.poll() is not None:
        raise AssertionError(f"run.py exited with {process.returncode}:\n{shop.log.read_text()}")
    try:
        return bool(shop.request("GET", "/stepped/lanes.json") == {"lanes": []})
    except OSError:
        return False


@pytest.fixture(scope="module")
def shop(shop_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """``python examples/flask_app/run.py --port P`` on the suite's Redis and a SQLite file."""
    folder = tmp_path_factory.mktemp("shop-browser")
    env = {
        "SHOP_REDIS_URL": shop_redis,
        "SHOP_DATABASE_URL": f"sqlite:///{folder / 'shop.db'}",
        "SHOP_ACTION_TOKEN": TOKEN,
    }
    with shop_module(env) as module, open(folder / "run.log", "wb") as log:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, str(SHOP / "run.py"), "--port", str(port)],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        running = Shop(f"http://127.0.0.1:{port}", module, folder / "run.log")
        try:
            wait_for("run.py to serve", lambda: serving(running, process), running)
            yield running
        finally:
            process.terminate()  # run.py stops its worker on SIGTERM
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium (Debian's package)."""
    executable = os.environ.get("STEPPED_CHROMIUM") or shutil.which("chromium")
    if executable is None:
        pytest.fail("no chromium on PATH: apt-get install chromium (or set STEPPED_CHROMIUM)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=QUIET_CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page, 1000 pixels wide."""
    opened = browser.new_page(viewport={"width": 1000, "height": 640})
    opened.set_default_timeout(WAIT * 1000)
    yield opened
    opened.close()


def test_the_tree_page_follows_the_tree_without_a_reload(
    shop: Shop, page: Page, tmp_path: Path
) -> None:
    order = shop.order("lamp")
    tree = shop.awaiting_payment(order)
    root, charge = tree["id"], tree["steps"][0]["members"][0]["action"]["id"]

    page.goto(f"{shop.base}/stepped/actions/{root}")
    assert page.get_attribute(f"#action-{root}", "data-status") == "performing"
    assert page.get_attribute(f"#action-{charge}", "data-status") == "performing"
    assert "waiting to be completed from outside" in page.inner_text(f"#action-{charge}")
    page.evaluate("window.steppedTestMarker = 'the same page'")

    completed = shop.request(
        "POST",
        f"/stepped/actions/{charge}/complete",
        {"status": "succeeded"},
        **{"Accept": "application/json", "X-Stepped-Token": TOKEN},
    )
    assert completed["status"] == "succeeded"

    page.wait_for_selector(f'#action-{root}[data-status="succeeded"]')
    assert page.evaluate("window.steppedTestMarker") == "the same page"  # never reloaded
    page.wait_for_function("document.getElementById('stepped-live').textContent.includes('Final')")
    text = page.inner_text("#stepped-tree")
    assert "step 1/3" in text and "step 2/3" in text and "step 3/3" in text
    assert "wait 1s" in text and "ship" in text
    assert shop.state(order)["state"] == "shipped"
    page.screenshot(path=str(tmp_path / "tree.png"), full_page=True)
    assert (tmp_path / "tree.png").read_bytes().startswith(b"\x89PNG")


def test_a_failed_child_shows_its_error(shop: Shop, page: Page, tmp_path: Path) -> None:
    order = shop.order("unicorn")
    root = shop.awaiting_payment(order)["id"]
    page.goto(f"{shop.base}/stepped/actions/{root}")
    shop.pay(order)

    page.wait_for_selector(f'#action-{root}[data-status="failed"]')
    pack = page.locator('.action[data-status="failed"]', has_text="pack").last
    assert "SoldOut: no unicorn left in the warehouse" in pack.locator(".error-text").inner_text()
    assert "1 of 2 unsuccessful" in page.inner_text("#stepped-tree")
    page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
    assert (tmp_path / "failed.png").stat().st_size > 0


def queued_charge(shop: Shop, order_id: int) -> int | None:
    """The id of a pending ``charge`` on the order, if one exists."""
    with shop.module.stepped.session() as session:
        return session.scalar(
            select(Action.id).where(
                Action.name == "charge",
                Action.actor_id == str(order_id),
                Action.status == "pending",
            )
        )


def test_the_lanes_page_lists_a_pending_action(shop: Shop, page: Page) -> None:
    order = shop.order("desk")
    shop.awaiting_payment(order)
    with shop.module.stepped.session() as session:
        stored = session.get(shop.module.Order, order)
        session.expunge(stored)
    shop.module.charge.later(stored)  # a second payment request queues behind the first
    pending = wait_for("the queued charge", lambda: queued_charge(shop, order), shop)

    page.goto(f"{shop.base}/stepped/lanes")
    row = page.locator("tr", has_text=f"Order/{order}/charge")
    assert row.locator(".pending").inner_text().startswith(f"#{pending} charge on Order/{order}")
    assert row.locator('.pending [data-status="pending"]').count() == 1

    back = shop.request("POST", f"/stepped/actions/{pending}/cancel", {"token": TOKEN})
    assert f'data-action-id="{pending}" data-status="cancelled"' in back  # redirected to it
    page.reload()
    assert page.locator("tr", has_text=f"Order/{order}/charge").locator(
        ".pending"
    ).inner_text() == ("none")
