"""`conveyor dev` as a user runs it: a real process in a directory of its own, with its own
embedded PostgreSQL in ./.conveyor/, on free ports.

Only the process that started the embedded cluster stops it: `conveyor migrate` (or a
`conveyor server` without a URL) in the same directory uses it and leaves it running, and a
second `conveyor dev` there is refused instead of taking it over.
"""

from __future__ import annotations

import shutil
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    assert_ok,
    assert_one_error_line,
    conveyor_command,
    free_port,
    run_cli,
    wait_final,
    wait_for,
)

from conveyor import Client, Task, TaskState
from conveyor.cli.database_option import EMBEDDED_DATA_DIR
from conveyor.storage.embedded import EmbeddedPostgres

# What `conveyor dev` prints once its server and demo worker are up.
RUNNING_BANNER = "Conveyor is running."


@dataclass
class DevProcess:
    """A `conveyor dev` child process (see the `start_dev` fixture)."""

    child: Any  # conftest.ChildProcess
    directory: Path
    grpc_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        return int(self.child.pid)

    def output(self) -> str:
        return str(self.child.output())

    def wait_running(self, timeout: float = 60) -> DevProcess:
        def up() -> bool:
            if self.child.process.poll() is not None:
                pytest.fail(
                    f"conveyor dev exited with {self.child.process.returncode}:\n{self.output()}"
                )
            return RUNNING_BANNER in self.output()

        wait_for(up, timeout=timeout, interval=0.05, what="conveyor dev to be running")
        return self


def cluster_running(directory: Path) -> bool:
    """Whether the embedded PostgreSQL of `directory` is up (PostgreSQL removes its pid file
    when it stops)."""
    return (directory / EMBEDDED_DATA_DIR / "postmaster.pid").exists()


def stop_cluster_left_in(directory: Path) -> None:
    """Stop an embedded cluster a failed test left running, and remove its data."""
    if cluster_running(directory):
        embedded = EmbeddedPostgres(directory / EMBEDDED_DATA_DIR)
        embedded.start()  # owns it: whatever started it has been stopped
        embedded.stop(mode="immediate")
    shutil.rmtree(directory / ".conveyor", ignore_errors=True)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The directory `conveyor dev` runs in (its data goes to ./.conveyor/ there)."""
    directory = tmp_path / "project"
    directory.mkdir()
    return directory


@pytest.fixture
def start_dev(processes: Callable[..., Any]) -> Iterator[Callable[..., DevProcess]]:
    """`start_dev(directory)` -> a running `conveyor dev` there, on free ports.

    Afterwards every one is stopped, then any cluster left running is stopped.
    """
    started: list[DevProcess] = []

    def start(directory: Path, *, name: str = "dev") -> DevProcess:
        grpc_port = free_port()
        child = processes(
            conveyor_command(
                "dev",
                "--grpc-listen",
                f"127.0.0.1:{grpc_port}",
                "--http-listen",
                f"127.0.0.1:{free_port()}",
            ),
            name=name,
            cwd=directory,
        )
        dev = DevProcess(child, directory, grpc_port)
        started.append(dev)
        return dev.wait_running()

    yield start
    for dev in started:
        dev.child.stop()
    for directory in {dev.directory for dev in started}:
        stop_cluster_left_in(directory)


def echo_succeeds(dev: DevProcess) -> None:
    """The dev's server and demo worker still work: an echo task runs to success."""
    with Client(dev.address) as client:
        task_id = client.enqueue_task(Task(type="demo.echo", payload=b"still here"))
        status = wait_final(client, task_id, timeout=30)
    assert status.state is TaskState.SUCCEEDED, dev.output()
    assert status.result == b"still here"


@pytest.mark.slow
class TestOneClusterOwner:
    def test_migrate_uses_the_running_dev_cluster_and_leaves_it_running(self, project, start_dev):
        """`conveyor migrate` without a URL joins the cluster of the dev that runs here, and
        leaves it running: before, it stopped it on exit, and the dev lost its database."""
        dev = start_dev(project)

        result = run_cli("migrate", cwd=project)
        assert assert_ok(result).startswith("schema is up to date")
        assert cluster_running(project)
        echo_succeeds(dev)
        # And it said whose cluster it used.
        assert f"which conveyor dev (pid {dev.pid}) runs" in result.stderr

        # Its owner still stops it.
        dev.child.signal(signal.SIGINT)
        assert dev.child.wait(60) == 0, dev.output()
        assert not cluster_running(project)

    def test_second_dev_in_the_same_directory_is_refused(self, project, start_dev):
        """A second `conveyor dev` where one runs exits with one line naming the first, and
        the first keeps working. Before, the second took the cluster over, and stopped it
        under the first when it exited."""
        first = start_dev(project)

        line = assert_one_error_line(
            run_cli(
                "dev",
                "--grpc-listen",
                f"127.0.0.1:{free_port()}",
                "--http-listen",
                f"127.0.0.1:{free_port()}",
                cwd=project,
                timeout=30,
            )
        )
        assert f"conveyor dev (pid {first.pid}) is already running in this directory" in line
        assert "stop it first" in line
        assert cluster_running(project)
        echo_succeeds(first)

        # The refusal rests on the owner being alive, not on what it left behind: once the
        # first is killed outright (its cluster still running), the next dev takes the
        # cluster over, and stops it when it stops.
        first.child.signal(signal.SIGKILL)
        first.child.wait(30)
        assert cluster_running(project)
        second = start_dev(project, name="dev-2")
        echo_succeeds(second)
        second.child.signal(signal.SIGINT)
        assert second.child.wait(60) == 0, second.output()
        assert not cluster_running(project)


@pytest.mark.slow
def test_dev_on_a_port_in_use_is_one_error_line_before_anything_starts(project):
    """Before: an OSError traceback from aiohttp, after PostgreSQL had been started (a
    second `conveyor dev` on the default ports died this way)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        result = run_cli(
            "dev",
            "--grpc-listen",
            f"127.0.0.1:{free_port()}",
            "--http-listen",
            taken,
            cwd=project,
            timeout=60,
        )
    try:
        line = assert_one_error_line(result)
        assert line == f"error: cannot listen on {taken} for HTTP: address already in use"
        assert not (project / EMBEDDED_DATA_DIR).exists()
    finally:
        stop_cluster_left_in(project)
