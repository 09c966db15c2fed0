"""Many coroutines and threads enqueue through one token's empty bucket.

Every refused request is retried as backpressure within the budget: each task is stored
exactly once (one `enqueued` event), none lost, none twice, and each refusal is counted.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

from conveyor import AsyncClient, Client, Task
from conveyor.auth import Role, new_token

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from conftest import ServerThread

COUNT_QUERY = (
    "SELECT t.id::text AS id, (SELECT count(*) FROM conveyor_task_history AS e "
    " WHERE e.task_id = t.id AND e.event = 'enqueued') AS enqueued "
    "FROM conveyor_tasks AS t WHERE t.id = ANY($1::uuid[])"
)


def serve(start_server: Callable[..., ServerThread], tmp_path: Path) -> tuple[Any, str]:
    token, entry = new_token("app", Role.PRODUCER)
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(entry.as_toml())
    # One request at a time, four a second: a request sent right after another is refused
    # however the client joins its enqueues (at 40/s a loaded run once sent so few
    # joined requests that none was).
    return start_server(tokens_file=tokens, rate_limit=4.0, rate_burst=1.0), token


async def test_async_coroutines_under_the_rate_limit_store_each_task_once(
    start_server: Callable[..., ServerThread], tmp_path: Path, db: Any
) -> None:
    server, token = serve(start_server, tmp_path)
    tasks = [Task(type="rl.async", payload=b"%d" % n) for n in range(120)]
    async with AsyncClient(server.address, token=token) as client:

        async def one(chunk: list[Task]) -> list[str]:
            return [await client.enqueue_task(t) for t in chunk]

        results = await asyncio.gather(*(one(tasks[n::30]) for n in range(30)))
    ids = [i for chunk in results for i in chunk]
    assert len(set(ids)) == len(tasks)
    rows = await asyncio.to_thread(db.fetch, COUNT_QUERY, ids)
    assert len(rows) == len(tasks)
    assert {row["enqueued"] for row in rows} == {1}
    assert server.server.metrics.limit_refusals.labels("request_rate")._value.get() >= 1


def test_threads_under_the_rate_limit_store_each_task_once(
    start_server: Callable[..., ServerThread], tmp_path: Path, db: Any
) -> None:
    server, token = serve(start_server, tmp_path)
    tasks = [Task(type="rl.sync", payload=b"%d" % n) for n in range(120)]
    errors: list[BaseException] = []
    ids: list[str] = []
    with Client(server.address, token=token) as client:

        def one(chunk: list[Task]) -> None:
            try:
                ids.extend(client.enqueue_task(t) for t in chunk)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(tasks[n::20],)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert len(set(ids)) == len(tasks)
    rows = db.fetch(COUNT_QUERY, ids)
    assert len(rows) == len(tasks)
    assert {row["enqueued"] for row in rows} == {1}
    assert server.server.metrics.limit_refusals.labels("request_rate")._value.get() >= 1
