"""AsyncClient.close() while a unary call (GetTask, CancelTask, ListTasks...) is in flight.

The docs (getting-started.md, and AsyncClient's docstring) say an AsyncClient's calls in
flight when it closes "finish or raise ServerUnavailable ("the client was closed")". A
web application closes its shared client at shutdown (a FastAPI lifespan) while request
handlers may still be awaiting it; those handlers were not cancelled, and must get a
ConveyorError they can handle, not a bare asyncio.CancelledError that makes their own task
look cancelled (a TaskGroup, an asyncio.timeout, a framework's request handling all read a
CancelledError as "this task was cancelled").

The call is held in flight for real: a SHARE lock on conveyor_tasks (taken in another
PostgreSQL session) makes the server's cancel statement wait.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from helpers import async_wait_for

from conveyor import AsyncClient, Task
from conveyor.errors import ServerUnavailable


async def test_a_call_in_flight_at_close_raises_server_unavailable_not_cancelled(
    server: Any, database_url: str
) -> None:
    client = AsyncClient(server.address)
    task_id = await client.enqueue_task(Task(type="embedding.close"))
    locker = await asyncpg.connect(database_url)
    try:
        await locker.execute("BEGIN; LOCK TABLE conveyor_tasks IN SHARE MODE")
        call = asyncio.create_task(client.cancel_task(task_id))
        await async_wait_for(
            lambda: locker.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted "
                "AND relation = 'conveyor_tasks'::regclass"
            ),
            what="the cancel waiting in PostgreSQL",
        )
        await asyncio.wait_for(client.close(), 5)  # the app's shutdown
        done, _ = await asyncio.wait({call}, timeout=10)
        assert done, "the call in flight never ended after close()"
        assert not call.cancelled(), (
            "cancel_task() in a task nobody cancelled raised asyncio.CancelledError "
            "because the client was closed; documented: ServerUnavailable"
        )
        assert isinstance(call.exception(), ServerUnavailable), repr(call.exception())
    finally:
        await locker.execute("ROLLBACK")
        await locker.close()
        await client.close()
