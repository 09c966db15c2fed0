"""A handler's forked child that awaits before it returns into the worker."""

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
    import os

    from conveyor import Worker

    worker = Worker(concurrency=2)
    OUT = os.environ["FORK_NOTES"]


    def note(line):
        fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\\n").encode())
        finally:
            os.close(fd)


    @worker.handler("fork.async.await")
    async def fork_async(ctx, payload):
        if os.fork() == 0:
            note(f"child {os.getpid()}")
            await asyncio.sleep(4)  # the child's own work, awaited
            return b"from the child"  # the bug: no os._exit()
        return b"from the parent"


    @worker.handler("noop")
    def noop(ctx, payload):
        return b"ok"
    """
)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
def test_an_async_handlers_child_that_awaits_is_no_second_worker(
    start_server: Any, db: Any, tmp_path: Path, processes: Any
) -> None:
    """As test_forking_handlers, but the child awaits before it returns: meanwhile its copy
    of the worker's loop runs the worker's heartbeats and polls on the parent's connections.
    The real worker must stay healthy: not lost, every task on one attempt."""
    server = start_server(
        heartbeat_interval=timedelta(seconds=1), worker_lost_after=timedelta(seconds=3)
    )
    (tmp_path / "forking_app2.py").write_text(APP)
    out = tmp_path / "notes.txt"
    worker = processes(
        conveyor_command("worker", "forking_app2:worker", "--server", server.address),
        name="worker",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(tmp_path), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
        ),
        FORK_NOTES=str(out),
    )
    with Client(server.address) as client:
        task_id = client.enqueue_task(Task(type="fork.async.await", max_retries=0))

        def noted() -> str | None:
            if not out.exists():
                return None
            lines = out.read_text().splitlines()
            return next((line for line in lines if line.startswith("child ")), None)

        child = int(wait_for(noted, what="the child's pid").split()[1])
        try:
            status = wait_final(client, task_id)
            assert status.state is TaskState.SUCCEEDED, status
            assert status.result == b"from the parent"
            until = time.monotonic() + 8
            results = []
            while time.monotonic() < until:
                noop = wait_final(
                    client, client.enqueue_task(Task(type="noop", max_retries=0)), timeout=15
                )
                results.append((noop.state, noop.attempts, noop.last_error))
                states = db.fetch("SELECT id, state FROM conveyor_workers")
                assert [r["state"] for r in states] == ["active"], (states, results)
            assert set(results) == {(TaskState.SUCCEEDED, 1, None)}, results
            wait_for(lambda: not alive(child), timeout=10, what="the child to exit")
            assert worker.process.poll() is None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
