"""Fixtures for the end-to-end tests: real `conveyor server` processes.

`server_process()` starts `conveyor server` as a child process (through the `processes`
fixture, so it is stopped after the test and its output is shown when the test fails) on
two free ports, and returns once `GET /readyz` answers 200. The returned `ServerProcess`
can be stopped (by signal, to its PID) and started again on the same ports and database,
which is what the restart and persistence tests need.
"""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import TESTS_DIR, conveyor_command, free_port, wait_for

E2E_DIR = Path(__file__).parent
READY_TIMEOUT = 30.0


@pytest.fixture
def e2e_pythonpath() -> str:
    """PYTHONPATH for child processes that import modules from tests/ and tests/e2e/."""
    return os.pathsep.join([str(TESTS_DIR), str(E2E_DIR)])


class ServerProcess:
    """A `conveyor server` child process that can be stopped and started again.

    Every start runs a new process on the same gRPC and HTTP ports and the same database,
    so clients and workers that know `address` can reconnect to it.
    """

    def __init__(
        self,
        spawn: Callable[..., Any],
        database_url: str,
        *,
        extra_args: tuple[str, ...] = (),
        name: str = "server",
    ) -> None:
        self._spawn = spawn
        self.database_url = database_url
        self.port = free_port()
        self.http_port = free_port()
        self.extra_args = extra_args
        self.name = name
        self.generation = 0
        self.process: Any = None  # the current ChildProcess

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return int(self.process.pid)

    def argv(self) -> list[str]:
        return conveyor_command(
            "server",
            "--database-url",
            self.database_url,
            "--grpc-listen",
            self.address,
            "--http-listen",
            f"127.0.0.1:{self.http_port}",
            "--retry-backoff-base",
            "0.05",
            "--retry-backoff-cap",
            "0.4",
            *self.extra_args,
        )

    def running(self) -> bool:
        return self.process is not None and self.process.process.poll() is None

    def start(self, *, timeout: float = READY_TIMEOUT) -> ServerProcess:
        """Start a new server process on the same ports; return once it is ready."""
        assert not self.running(), "the server process is already running"
        self.generation += 1
        self.process = self._spawn(self.argv(), name=f"{self.name}-{self.generation}")
        self.wait_ready(timeout=timeout)
        return self

    def ready(self) -> bool:
        """Whether GET /readyz answers 200 (the database is reachable, schema checked)."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/readyz", timeout=2) as response:  # noqa: S310 - our own http:// URL
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, *, timeout: float = READY_TIMEOUT) -> None:
        def check() -> bool:
            if self.process is not None and self.process.process.poll() is not None:
                pytest.fail(
                    f"server process exited with {self.process.process.returncode} before "
                    f"it was ready:\n{self.process.output()}"
                )
            return self.ready()

        wait_for(check, timeout=timeout, interval=0.05, what=f"{self.http_url}/readyz to be 200")

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 30) -> int:
        """Send `sig` to the server process (by PID) and return its exit status."""
        assert self.process is not None
        self.process.signal(sig)
        return int(self.process.wait(timeout))

    def restart(self, *, timeout: float = READY_TIMEOUT) -> int:
        """SIGTERM the process, start a new one on the same ports; return the old exit status."""
        status = self.stop()
        self.start(timeout=timeout)
        return status


@pytest.fixture
def server_process(
    database_url: str, processes: Callable[..., Any]
) -> Callable[..., ServerProcess]:
    """Start real `conveyor server` processes: `server_process()` -> a ready ServerProcess.

    `server_process(*extra_args, database_url=..., name=...)`; stopped after the test.
    `database_url` is requested before `processes` so that the processes are stopped
    before the test's database is dropped.
    """
    counter = iter(range(1, 1000))

    def start(
        *extra_args: str, database_url: str = database_url, name: str | None = None
    ) -> ServerProcess:
        label = name or f"server{next(counter)}"
        return ServerProcess(
            processes, database_url, extra_args=tuple(extra_args), name=label
        ).start()

    return start
