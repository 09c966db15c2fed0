"""Task chaining from handlers in a real `conveyor worker` process.

Handlers enqueue a follow-up task through a client made once at module level (imported
before the worker starts), many at once: a sync Client shared by the handler threads, an
AsyncClient shared by the async handlers on the worker's loop, and the sync Client inside
async handlers (blocking the loop for the call). Every parent succeeds on one attempt and
its child exists exactly once. A module-level AsyncClient used from sync handlers through
asyncio.run() on several threads at once is refused with a clear ConfigError.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import TESTS_DIR, conveyor_command, wait_final, wait_for

from conveyor import Task, TaskState

APP = textwrap.dedent(
    """
    import asyncio

    from conveyor import AsyncClient, Client, Task, Worker

    worker = Worker(concurrency=8)
    client = Client()
    async_client = AsyncClient()


    def child_of(ctx):
        return Task(type="child", payload=ctx.task_id.encode())


    @worker.handler("parent.sync")
    def parent_sync(ctx, payload):
        return client.enqueue_task(child_of(ctx)).encode()


    @worker.handler("parent.async")
    async def parent_async(ctx, payload):
        return (await async_client.enqueue_task(child_of(ctx))).encode()


    @worker.handler("parent.async_with_sync_client")
    async def parent_async_with_sync_client(ctx, payload):
        return client.enqueue_task(child_of(ctx)).encode()


    @worker.handler("parent.sync_with_async_client")
    def parent_sync_with_async_client(ctx, payload):
        return asyncio.run(async_client.enqueue_task(child_of(ctx))).encode()


    @worker.handler("child")
    def child(ctx, payload):
        return payload
    """
)

PARENTS = 40


def start_app(tmp_path: Path, processes: Any, address: str) -> Any:
    (tmp_path / "chain_app.py").write_text(APP)
    return processes(
        conveyor_command("worker", "chain_app:worker", "--server", address),
        name="worker",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(tmp_path), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
        ),
        CONVEYOR_SERVER=address,
    )


@pytest.mark.parametrize(
    "parent_type", ["parent.sync", "parent.async", "parent.async_with_sync_client"]
)
def test_children_enqueued_by_concurrent_handlers_exist_once(
    server: Any, client: Any, db: Any, tmp_path: Path, processes: Any, parent_type: str
) -> None:
    start_app(tmp_path, processes, server.address)
    parents = client.enqueue_tasks([Task(type=parent_type, max_retries=0) for _ in range(PARENTS)])
    for parent_id in parents:
        status = wait_final(client, parent_id, timeout=60)
        assert (status.state, status.attempts) == (TaskState.SUCCEEDED, 1), status
        child = wait_final(client, status.result.decode(), timeout=60)
        assert (child.state, child.result) == (TaskState.SUCCEEDED, parent_id.encode())
    rows = db.fetch(
        "SELECT payload, count(*) AS n, max(attempt) AS attempts FROM conveyor_tasks "
        "WHERE type = 'child' GROUP BY payload"
    )
    assert sorted(bytes(r["payload"]).decode() for r in rows) == sorted(parents)
    assert {(r["n"], r["attempts"]) for r in rows} == {(1, 1)}


def test_an_async_client_shared_by_sync_handlers_is_refused_clearly(
    server: Any, client: Any, tmp_path: Path, processes: Any
) -> None:
    start_app(tmp_path, processes, server.address)
    parents = client.enqueue_tasks(
        [Task(type="parent.sync_with_async_client", max_retries=0) for _ in range(PARENTS)]
    )
    statuses = [wait_final(client, parent_id, timeout=60) for parent_id in parents]
    failed = [s for s in statuses if s.state is TaskState.FAILED]
    for status in failed:
        assert status.last_error.startswith(
            "ConfigError: this AsyncClient belongs to another event loop"
        ), status.last_error
    succeeded = [s for s in statuses if s.state is TaskState.SUCCEEDED]
    assert len(failed) + len(succeeded) == PARENTS
    for status in succeeded:
        wait_for(
            lambda s=status: client.get_task_status(s.result.decode()).state.is_final,
            what="the child",
        )
