"""Group commit: concurrent enqueues share statements, and each call still gets its own answer."""

from __future__ import annotations

import asyncio
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
from prometheus_client.parser import text_string_to_metric_families

from conveyor import AsyncClient, Task
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.types import new_task_id

GROUP_METRIC = "conveyor_enqueue_group_calls"


def group_histogram(http_url: str) -> tuple[float, float]:
    """(statements, calls) recorded by the group-commit histogram."""
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as response:  # noqa: S310
        body = response.read().decode()
    values = {
        found.name: found.value
        for family in text_string_to_metric_families(body)
        for found in family.samples
        if found.name in (f"{GROUP_METRIC}_count", f"{GROUP_METRIC}_sum")
    }
    return values[f"{GROUP_METRIC}_count"], values[f"{GROUP_METRIC}_sum"]


def test_concurrent_single_enqueues_share_statements(server, db) -> None:
    """64 calls at once: every task is created once, each call gets its own id back, and
    fewer statements than calls ran."""

    async def enqueue_all() -> list[tuple[str, str]]:
        async with AsyncClient(server.address) as client:
            ids = [new_task_id() for _ in range(64)]
            returned = await asyncio.gather(
                *(client.enqueue_task(Task(type="group.t", id=task_id)) for task_id in ids)
            )
        return list(zip(ids, returned, strict=True))

    before = group_histogram(server.http_url)
    pairs = asyncio.run(enqueue_all())
    assert all(sent == got for sent, got in pairs)
    statements, calls = (
        after - earlier
        for after, earlier in zip(group_histogram(server.http_url), before, strict=True)
    )
    assert calls == 64
    assert statements < calls, "no two calls shared a statement"
    assert db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE type = 'group.t'") == 64
    assert (
        db.fetchval(
            "SELECT count(*) FROM conveyor_task_events e JOIN conveyor_tasks t ON t.id = e.task_id "
            "WHERE t.type = 'group.t' AND e.event = 'enqueued'"
        )
        == 64
    )


def test_racing_calls_with_one_id_create_it_once(server, db) -> None:
    """Two calls carrying the same id in one statement: one `created`, as if sequential."""
    task_id = new_task_id()
    spec = pb.TaskSpec(id=task_id, type="group.same", timeout={"seconds": 10})

    def call(_index: int) -> bool:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            response = stub.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[spec]), timeout=10)
        assert list(response.task_ids) == [task_id]
        return bool(response.created[0])

    with ThreadPoolExecutor(max_workers=16) as pool:
        created = list(pool.map(call, range(16)))
    assert created.count(True) == 1
    assert db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE id = $1::uuid", task_id) == 1
    assert (
        db.fetchval("SELECT count(*) FROM conveyor_task_events WHERE task_id = $1::uuid", task_id)
        == 1
    )


def test_group_commit_can_be_turned_off(start_server, db) -> None:
    """--no-group-commit: each call is its own statement (for measuring the lever)."""
    server = start_server(group_commit=False)

    async def enqueue_all() -> None:
        async with AsyncClient(server.address) as client:
            await asyncio.gather(*(client.enqueue_task(Task(type="group.off")) for _ in range(16)))

    asyncio.run(enqueue_all())
    assert group_histogram(server.http_url) == (0, 0)
    assert db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE type = 'group.off'") == 16
