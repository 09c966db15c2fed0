"""Handlers that fork, in a real `conveyor worker` process.

A handler that calls os.fork() and whose child, by mistake, returns (or raises) into the
worker's code instead of calling os._exit: the child must not act as a second worker (no
report, no heartbeats on the parent's connections), must not linger, and the real worker
must stay healthy. Children made by `multiprocessing` (fork start method) must be
terminable as usual.
"""

from __future__ import annotations

import contextlib
import os
import signal
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import TESTS_DIR, conveyor_command, wait_final, wait_for

from conveyor import Client, Task, TaskState

APP = textwrap.dedent(
    """
    import asyncio
    import multiprocessing
    import os
    import time

    from conveyor import Worker

    worker = Worker(concurrency=2)
    OUT = os.environ["FORK_NOTES"]


    def note(line):
        fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\\n").encode())
        finally:
            os.close(fd)


    @worker.handler("fork.async")
    async def fork_async(ctx, payload):
        if os.fork() == 0:
            note(f"child {os.getpid()}")
            return b"from the child"  # the bug: no os._exit()
        return b"from the parent"


    @worker.handler("fork.async.await")
    async def fork_async_await(ctx, payload):
        if os.fork() == 0:
            note(f"child {os.getpid()}")
            # Meanwhile the child's copy of the worker's loop runs the worker's heartbeats
            # and polls on the parent's connections.
            await asyncio.sleep(4)
            return b"from the child"  # the bug: no os._exit()
        return b"from the parent"


    @worker.handler("fork.sync")
    def fork_sync(ctx, payload):
        if os.fork() == 0:
            note(f"child {os.getpid()}")
            return b"from the child"  # the bug: no os._exit()
        return b"from the parent"


    @worker.handler("mp.terminate")
    def mp_terminate(ctx, payload):
        process = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        process.start()
        note(f"child {process.pid}")
        time.sleep(0.5)
        process.terminate()
        process.join(10)
        if process.exitcode is None:
            process.kill()
            process.join()
            return b"terminate() did not end the child"
        return f"exitcode {process.exitcode}".encode()


    @worker.handler("noop")
    def noop(ctx, payload):
        return b"ok"
    """
)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def start_app(tmp_path: Path, processes: Any, address: str) -> tuple[Any, Path]:
    (tmp_path / "forking_app.py").write_text(APP)
    out = tmp_path / "notes.txt"
    worker = processes(
        conveyor_command("worker", "forking_app:worker", "--server", address),
        name="worker",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(tmp_path), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
        ),
        FORK_NOTES=str(out),
    )
    return worker, out


def child_pid(out: Path) -> int:
    def noted() -> str | None:
        if not out.exists():
            return None
        lines = out.read_text().splitlines()
        return next((line for line in lines if line.startswith("child ")), None)

    return int(wait_for(noted, what="the child's pid").split()[1])


@pytest.mark.slow
@pytest.mark.parametrize("task_type", ["fork.async", "fork.async.await", "fork.sync"])
def test_a_forked_child_returning_into_the_worker_is_no_second_worker(
    start_server: Any, db: Any, tmp_path: Path, processes: Any, task_type: str
) -> None:
    # A worker silent for 3 s is lost: the child's heartbeats on the parent's connections
    # broke the parent's within that.
    server = start_server(
        heartbeat_interval=timedelta(seconds=1), worker_lost_after=timedelta(seconds=3)
    )
    worker, out = start_app(tmp_path, processes, server.address)
    with Client(server.address) as client:
        task_id = client.enqueue_task(Task(type=task_type, max_retries=0))
        child = child_pid(out)
        try:
            status = wait_final(client, task_id)
            assert status.state is TaskState.SUCCEEDED, status
            assert status.result == b"from the parent"
            assert [e.event for e in status.history] == ["enqueued", "started", "succeeded"]

            # The real worker stays healthy: for longer than the server takes to call a
            # silent worker lost (and than a child that awaits lives), every task runs at
            # once, on one attempt.
            until = time.monotonic() + 6
            while time.monotonic() < until:
                noop = wait_final(
                    client, client.enqueue_task(Task(type="noop", max_retries=0)), timeout=10
                )
                assert (noop.state, noop.attempts, noop.last_error) == (
                    TaskState.SUCCEEDED,
                    1,
                    None,
                )
                assert db.fetchval("SELECT state FROM conveyor_workers") == "active"
            # The child is not left running the worker's code.
            wait_for(lambda: not alive(child), timeout=10, what=f"the forked child {child} to exit")
            assert worker.process.poll() is None
            assert "returned into the worker instead of calling os._exit()" in worker.output()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_a_multiprocessing_child_of_a_handler_ends_on_terminate(
    server: Any, client: Any, tmp_path: Path, processes: Any
) -> None:
    """Process.terminate() sends SIGTERM; the child must end, not run on as if it were the
    worker asked to stop gracefully."""
    worker, out = start_app(tmp_path, processes, server.address)
    task_id = client.enqueue_task(Task(type="mp.terminate", max_retries=0))
    child = child_pid(out)
    try:
        status = wait_final(client, task_id, timeout=40)
        assert status.state is TaskState.SUCCEEDED, status
        assert status.result == f"exitcode -{signal.SIGTERM}".encode()
        assert "received SIGTERM" not in worker.output()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
