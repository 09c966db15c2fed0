"""A worker outlives whatever its handlers do, and every attempt ends in a report that says why.

A handler may exit the interpreter, be called with the wrong signature, raise an exception
that cannot be printed, return a buffer that cannot be read, swallow its cancellation or
stop its own worker. None of it may kill the worker or leave an attempt to a silent lease
expiry that blames a healthy worker.
"""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest
from helpers import running, wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker


def events(db, task_id: str) -> list[str]:
    return [e["event"] for e in db.events(task_id)]


class TestExitingHandlers:
    @pytest.mark.parametrize(
        ("exit_with", "error"),
        [(SystemExit(2), "SystemExit: 2"), (KeyboardInterrupt(), "KeyboardInterrupt")],
        ids=["SystemExit", "KeyboardInterrupt"],
    )
    def test_an_async_handler_exiting_fails_its_attempt_and_the_worker_runs_on(
        self, server, client: Client, db, exit_with: BaseException, error: str
    ) -> None:
        """argparse on a bad payload calls sys.exit inside an async handler: that attempt
        fails, as in a sync handler, while the attempt beside it finishes on the same worker
        (the exit once ended the worker's event loop, and every lease with it)."""
        long_started = threading.Event()
        release_long = threading.Event()
        worker = Worker(server.address, concurrency=2)

        @worker.handler("long")
        async def long(_ctx, _payload):
            long_started.set()
            await asyncio.to_thread(release_long.wait, 15)
            return b"long done"

        @worker.handler("exits")
        async def exits(_ctx, _payload):
            raise exit_with

        with running(worker):
            long_id = client.enqueue_task(Task(type="long", max_retries=0))
            wait_for(long_started.is_set, what="the long handler to start")
            exit_id = client.enqueue_task(Task(type="exits", max_retries=0))
            exited = wait_final(client, exit_id, timeout=15)
            assert worker.running
            release_long.set()
            finished = wait_final(client, long_id, timeout=15)

        assert exited.state is TaskState.FAILED
        assert exited.last_error == error
        assert events(db, exit_id) == ["enqueued", "started", "failed"]
        assert finished.state is TaskState.SUCCEEDED
        assert finished.result == b"long done"
        assert (
            db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker.worker_id)
            == "stopped"
        )

    def test_a_sync_handler_exiting_fails_its_attempt(self, server, client: Client) -> None:
        worker = Worker(server.address, concurrency=1)

        @worker.handler("exits")
        def exits(_ctx, _payload):
            sys.exit(3)

        with running(worker):
            status = wait_final(client, client.enqueue_task(Task(type="exits", max_retries=0)))
            assert worker.running
        assert status.state is TaskState.FAILED
        assert status.last_error == "SystemExit: 3"
