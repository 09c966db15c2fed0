"""An async handler whose sub-task exits (sys.exit, argparse, KeyboardInterrupt).

getting-started.md: "That includes SystemExit and KeyboardInterrupt (argparse calls
sys.exit on bad arguments), in async handlers as in sync ones: a handler never ends its
worker." An async handler rarely does all of its work in its own coroutine: it awaits
asyncio.wait_for (which runs the coroutine as a task), gather, or a TaskGroup. The exit
raised there must fail that attempt like one raised in the handler's own coroutine, while
the attempt beside it finishes on the same worker.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import pytest
from helpers import running, wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker


async def parse_arguments(_payload: bytes) -> bytes:
    await asyncio.sleep(0)
    sys.exit(2)  # what argparse does with bad arguments


async def under_wait_for(_ctx: Any, payload: bytes) -> bytes:
    return await asyncio.wait_for(parse_arguments(payload), timeout=5)


async def under_gather(_ctx: Any, payload: bytes) -> bytes:
    (result,) = await asyncio.gather(parse_arguments(payload))
    return result


async def under_task_group(_ctx: Any, payload: bytes) -> bytes:
    async with asyncio.TaskGroup() as group:
        task = group.create_task(parse_arguments(payload))
    return task.result()


@pytest.mark.parametrize(
    "handler",
    [under_wait_for, under_gather, under_task_group],
    ids=["wait_for", "gather", "TaskGroup"],
)
def test_an_exit_in_a_handlers_sub_task_fails_the_attempt_not_the_worker(
    server: Any, client: Client, db: Any, handler: Any
) -> None:
    long_started = threading.Event()
    release_long = threading.Event()
    worker = Worker(server.address, concurrency=2)

    @worker.handler("long")
    async def long(_ctx: Any, _payload: bytes) -> bytes:
        long_started.set()
        await asyncio.to_thread(release_long.wait, 15)
        return b"long done"

    worker.register_handler("exits", handler)

    with running(worker):
        long_id = client.enqueue_task(Task(type="long", max_retries=0))
        wait_for(long_started.is_set, what="the long handler to start")
        exit_id = client.enqueue_task(Task(type="exits", max_retries=0))
        exited = wait_final(client, exit_id, timeout=15)
        assert worker.running, "the worker ended"
        release_long.set()
        finished = wait_final(client, long_id, timeout=15)

    assert exited.state is TaskState.FAILED
    assert exited.last_error == "SystemExit: 2"
    assert [e.event for e in exited.history] == ["enqueued", "started", "failed"]
    assert finished.state is TaskState.SUCCEEDED
    assert finished.result == b"long done"
