"""A server with a small `max_batch` and a client joining concurrent single-task enqueues
into one request: each caller enqueued one task, within every limit, and each succeeds
(the joined request's INVALID_ARGUMENT is split per call)."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

from conveyor import AsyncClient, Client, Task

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import ServerThread


def test_threads_enqueueing_one_task_each_all_succeed(
    start_server: Callable[..., ServerThread], db: Any
) -> None:
    server = start_server(max_batch=2)
    ids: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(24)
    with Client(server.address) as client:

        def one(n: int) -> None:
            barrier.wait()
            try:
                ids.extend(
                    client.enqueue_task(Task(type="sb.t", payload=b"%d-%d" % (n, k)))
                    for k in range(5)
                )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(n,)) for n in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert len(set(ids)) == 120
    assert len(db.fetch("SELECT id FROM conveyor_tasks WHERE id = ANY($1::uuid[])", ids)) == 120
    assert server.server is not None
    assert server.server.metrics.limit_refusals.labels("batch_size")._value.get() >= 1


async def test_coroutines_enqueueing_one_task_each_all_succeed(
    start_server: Callable[..., ServerThread], db: Any
) -> None:
    server = start_server(max_batch=2)
    async with AsyncClient(server.address) as client:
        ids = await asyncio.gather(
            *(client.enqueue_task(Task(type="sb.t", payload=b"%d" % n)) for n in range(100))
        )
    assert len(set(ids)) == 100
    rows = await asyncio.to_thread(
        db.fetch, "SELECT id FROM conveyor_tasks WHERE id = ANY($1::uuid[])", list(ids)
    )
    assert len(rows) == 100
    # The joined requests were over the server's max_batch and were split per call.
    assert server.server is not None
    assert server.server.metrics.limit_refusals.labels("batch_size")._value.get() >= 1
