"""A handler that closes sys.stderr, in a real `conveyor worker` process.

The worker logs to stderr. Once a handler has closed it (a library "daemonising" itself, a
`with open(...) as sys.stderr` gone wrong), each log line raises inside logging's own error
handler. The worker's attempts must still end in reports that say what happened: not in
silent lease expiries blamed on the worker.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

from helpers import TESTS_DIR, conveyor_command, wait_final

from conveyor import Task, TaskState

APP = textwrap.dedent(
    """
    import asyncio
    import sys

    from conveyor import Worker

    worker = Worker(concurrency=2)


    @worker.handler("close.stderr")
    def close_stderr(ctx, payload):
        sys.stderr.close()
        return b"closed"


    @worker.handler("fails")
    def fails(ctx, payload):
        raise ValueError("bad input")


    @worker.handler("slow")
    async def slow(ctx, payload):
        await asyncio.sleep(30)
        return b"slept"
    """
)


def test_attempts_are_still_reported_after_a_handler_closed_stderr(
    server: Any, client: Any, db: Any, tmp_path: Path, processes: Any
) -> None:
    (tmp_path / "closed_stderr_app.py").write_text(APP)
    processes(
        conveyor_command("worker", "closed_stderr_app:worker", "--server", server.address),
        name="worker",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(tmp_path), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
        ),
    )
    closed = wait_final(client, client.enqueue_task(Task(type="close.stderr", max_retries=0)))
    assert closed.state is TaskState.SUCCEEDED

    # Reported by the worker within moments, not by the reaper a lease (30 s) later.
    failed = wait_final(client, client.enqueue_task(Task(type="fails", max_retries=0)), timeout=10)
    assert failed.state is TaskState.FAILED
    assert failed.last_error == "ValueError: bad input"
    assert [e.event for e in failed.history] == ["enqueued", "started", "failed"]

    timed_out = wait_final(
        client, client.enqueue_task(Task(type="slow", max_retries=0, timeout=1)), timeout=10
    )
    assert timed_out.state is TaskState.FAILED
    assert timed_out.last_error == "TimeoutError: the handler ran past its timeout of 1s"
