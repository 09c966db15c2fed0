"""A worker's event loop closes only once grpc owes it nothing, also when it crashed.

grpc.aio serves every loop of a process from one completion queue, so the completions of
a worker's calls that were cancelled as its loop closed reach the process's other loops
(here the server's, as in `conveyor dev`), which raised `RuntimeError: Event loop is
closed` for each one.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import wait_for

from conveyor import Client, Task, TaskContext, Worker


async def crash(_ctx: TaskContext, _payload: bytes) -> bytes:
    """End the worker's event loop on an error it cannot handle (outside any handler)."""
    asyncio.get_running_loop().stop()  # its run_until_complete then raises RuntimeError
    return b"crash scheduled"


class TestCrashedWorkerLoops:
    def test_restarted_crashing_workers_leave_no_completion_to_a_closed_loop(
        self, server, client: Client, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Each incarnation crashes with its work stream and heartbeats open, then the
        next starts, as an application restarting its crashed worker does. Before, most
        crashes logged 'Event loop is closed' tracebacks from grpc on the server's loop."""
        caplog.set_level(logging.ERROR, logger="asyncio")
        for incarnation in range(8):
            worker = Worker(server.address, worker_id=f"crashing-{incarnation}")
            worker.register_handler("crash", crash)
            worker.start()
            client.enqueue_task(Task(type="crash"))
            wait_for(lambda w=worker: not w.running, timeout=30, what="the worker to crash")
        # Whatever grpc still owed a closed loop arrives once the server ends its calls.
        server.stop()
        assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
