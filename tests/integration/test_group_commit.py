"""Group commit: concurrent enqueues share statements, and each call still gets its own answer."""

from __future__ import annotations

import asyncio
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
from helpers import rpc_count
from prometheus_client.parser import text_string_to_metric_families

from conveyor import AsyncClient, Client, Task
from conveyor.errors import InvalidTask
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


def _group_delta(http_url: str, before: tuple[float, float]) -> tuple[float, float]:
    """(statements, calls) since `before`."""
    after = group_histogram(http_url)
    return after[0] - before[0], after[1] - before[1]


def invalid_enqueue_calls(http_url: str) -> float:
    """EnqueueTasks calls the server answered INVALID_ARGUMENT."""
    return rpc_count(http_url, "EnqueueTasks", "INVALID_ARGUMENT")


def test_concurrent_single_enqueue_calls_share_statements(server, db) -> None:
    """64 EnqueueTasks calls at once: every task is created once, each call gets its own id
    back, and fewer statements than calls ran."""

    async def enqueue_all() -> list[tuple[str, list[str]]]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            ids = [new_task_id() for _ in range(64)]
            responses = await asyncio.gather(
                *(
                    stub.EnqueueTasks(
                        pb.EnqueueTasksRequest(
                            tasks=[pb.TaskSpec(id=task_id, type="group.t", timeout={"seconds": 9})]
                        ),
                        timeout=10,
                    )
                    for task_id in ids
                )
            )
        return [(task_id, list(r.task_ids)) for task_id, r in zip(ids, responses, strict=True)]

    before = group_histogram(server.http_url)
    pairs = asyncio.run(enqueue_all())
    assert all([sent] == got for sent, got in pairs)
    statements, calls = _group_delta(server.http_url, before)
    assert calls == 64
    assert statements < calls, "no two calls shared a statement"
    assert db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE type = 'group.t'") == 64
    assert (
        db.fetchval(
            "SELECT count(*) FROM conveyor_task_history e"
            " JOIN conveyor_tasks t ON t.id = e.task_id"
            " WHERE t.type = 'group.t' AND e.event = 'enqueued'"
        )
        == 64
    )


def test_concurrent_enqueues_on_one_async_client_share_requests(server, db) -> None:
    """An AsyncClient joins the enqueues of coroutines that wait together into one request:
    the server sees fewer calls than tasks, and each coroutine still gets its own id."""

    async def enqueue_all() -> list[tuple[str, str]]:
        async with AsyncClient(server.address) as client:
            ids = [new_task_id() for _ in range(64)]
            returned = await asyncio.gather(
                *(
                    client.enqueue_task(
                        Task(type="group.client", id=task_id, payload=task_id.encode())
                    )
                    for task_id in ids
                )
            )
        return list(zip(ids, returned, strict=True))

    before = group_histogram(server.http_url)
    pairs = asyncio.run(enqueue_all())
    assert all(sent == got for sent, got in pairs)
    _statements, calls = _group_delta(server.http_url, before)
    assert 1 <= calls < 64, f"{calls} requests for 64 concurrent enqueues"
    rows = db.fetch("SELECT id::text, payload FROM conveyor_tasks WHERE type = 'group.client'")
    # Each task kept its own payload through the joined request.
    assert sorted((row["id"], bytes(row["payload"])) for row in rows) == sorted(
        (task_id, task_id.encode()) for task_id, _ in pairs
    )


def test_a_bad_task_in_a_joined_request_fails_only_its_own_call(start_server, db) -> None:
    """The server refuses one coroutine's task (over its payload limit, which the client does
    not know): that call raises InvalidTask, and the calls it was joined with succeed."""
    server = start_server(max_payload_bytes=1024)

    async def enqueue_all() -> list[str | BaseException]:
        async with AsyncClient(server.address) as client:
            return await asyncio.gather(
                *(
                    client.enqueue_task(
                        Task(type="group.split", payload=b"x" * (2048 if index == 5 else 16))
                    )
                    for index in range(12)
                ),
                return_exceptions=True,
            )

    answers = asyncio.run(enqueue_all())
    assert isinstance(answers[5], InvalidTask)
    assert "payload" in str(answers[5])
    others = [answer for index, answer in enumerate(answers) if index != 5]
    assert all(isinstance(answer, str) for answer in others)
    stored = db.fetch("SELECT id::text FROM conveyor_tasks WHERE type = 'group.split'")
    assert sorted(row["id"] for row in stored) == sorted(others)
    # The 12 calls were joined first: the server refused one request of several tasks.
    refused = invalid_enqueue_calls(server.http_url)
    assert refused >= 2, "the bad task was never in a joined request"


def test_threads_sharing_one_client_share_requests(server, db) -> None:
    """The sync Client joins the enqueues of threads that wait together, as AsyncClient
    does for coroutines: fewer requests than calls, each thread its own ids; a task the
    server refuses fails only its own call."""
    bad_index = 17

    def enqueue(index: int) -> str | BaseException:
        payload = b"x" * (2 * 1024 * 1024 if index == bad_index else 8)
        try:
            return client.enqueue_task(Task(type="group.threads", payload=payload))
        except InvalidTask as exc:
            return exc

    before = group_histogram(server.http_url)
    with Client(server.address) as client, ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(enqueue, range(64)))
    assert isinstance(answers[bad_index], InvalidTask)
    ids = [answer for index, answer in enumerate(answers) if index != bad_index]
    assert all(isinstance(answer, str) for answer in ids)
    assert len(set(ids)) == 63
    _statements, calls = _group_delta(server.http_url, before)
    assert calls < 63, f"{calls} requests for 63 accepted enqueues from 16 threads"
    stored = db.fetch("SELECT id::text FROM conveyor_tasks WHERE type = 'group.threads'")
    assert sorted(row["id"] for row in stored) == sorted(ids)


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
        db.fetchval("SELECT count(*) FROM conveyor_task_history WHERE task_id = $1::uuid", task_id)
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
