"""A refused GetTask or CancelTask reaches the caller with the error's context attributes.

`conveyor.errors` promises that "context is kept in attributes so callers never parse
strings": `TaskNotFound.task_id`, and `TaskAlreadyFinished.task_id` and `.state` (the final
state that made the cancel impossible). The server raises them with those attributes set,
but only the status's message crosses the wire: the clients rebuilt the error from it with
every attribute None (found by a review). `error_from_status` now reads them back from the
errors' own default text. (The sync cancel is checked in test_task_api.py.)
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from helpers import succeed_as_a_worker

from conveyor import AsyncClient, Client, Task
from conveyor.errors import TaskAlreadyFinished, TaskNotFound


def test_sync_unknown_task_says_its_id(client: Client) -> None:
    task_id = str(uuid.uuid4())
    with pytest.raises(TaskNotFound) as caught:
        client.get_task_status(task_id)
    assert caught.value.task_id == task_id, (
        f"TaskNotFound carried task_id={caught.value.task_id!r}; message: {caught.value.message!r}"
    )


async def test_async_cancel_of_a_succeeded_task_says_its_id_and_state(server: Any) -> None:
    async with AsyncClient(server.address) as client:
        task_id = await client.enqueue_task(Task(type="context.finished"))
        await asyncio.to_thread(succeed_as_a_worker, server.address, "context.finished")
        with pytest.raises(TaskAlreadyFinished) as caught:
            await client.cancel_task(task_id)
    assert (caught.value.task_id, caught.value.state) == (task_id, "succeeded"), (
        f"TaskAlreadyFinished carried task_id={caught.value.task_id!r}, "
        f"state={caught.value.state!r}; message: {caught.value.message!r}"
    )
