"""Bulk enqueue keeps every guarantee of a single enqueue, on each of its paths.

A batch of distinct new ids takes the fast insert (`task_insert_many`, which fails as a
whole on a taken id); a batch with a taken or repeated id, or a small one, takes the
statement that skips taken ids (`task_insert_skipping_taken`), and a lone task its one-row
form (`task_insert_one`). Columns that are the same
for every task travel as one value. The server checks a common batch column by column and
anything else task by task. Whichever way a batch goes, each task is stored once, with its
own fields and its one `enqueued` event (read from its row), in batch order, and the answer
says which tasks the call created.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor import AsyncClient, Client, Task
from conveyor.client.core import (
    MAX_BATCH,
    MAX_REQUEST_BYTES,
    enqueue_batches,
    enqueue_request,
)
from conveyor.errors import InvalidTask
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.storage import queries
from conveyor.types import new_task_ids

BATCH = 1000


def spec(task_id: str | None = None, **fields: Any) -> pb.TaskSpec:
    """A valid TaskSpec (a new UUIDv7 id unless given) unless `fields` override something."""
    values: dict[str, Any] = {
        "id": task_id or new_task_ids(1)[0],
        "type": "bulk.t",
        "timeout": Duration(seconds=60),
        "max_retries": 3,
    }
    values.update(fields)
    return pb.TaskSpec(**values)


def enqueue(stub: Any, specs: list[pb.TaskSpec]) -> pb.EnqueueTasksResponse:
    response: pb.EnqueueTasksResponse = stub.EnqueueTasks(
        pb.EnqueueTasksRequest(tasks=specs), timeout=30
    )
    return response


def stored_in_order(db: Any) -> list[str]:
    """Every task id, in queue (seq) order."""
    return [str(row["id"]) for row in db.fetch("SELECT id FROM conveyor_tasks ORDER BY seq")]


def enqueued_events(db: Any) -> dict[str, int]:
    """Per task id: how many `enqueued` events its history has."""
    rows = db.fetch(
        "SELECT task_id, count(*) AS n FROM conveyor_task_history WHERE event = 'enqueued' "
        "GROUP BY task_id"
    )
    return {str(row["task_id"]): row["n"] for row in rows}


class TestNewIds:
    def test_batch_ids_are_canonical_uuid_version_7(self) -> None:
        """new_task_ids makes canonical, distinct UUIDv7s with the RFC 4122 variant."""
        ids = new_task_ids(5000)
        assert len(set(ids)) == len(ids)
        for task_id in ids:
            parsed = uuid.UUID(task_id)
            assert str(parsed) == task_id
            assert parsed.version == 7
            assert parsed.variant == uuid.RFC_4122

    def test_batch_ids_carry_the_time_and_sort_by_it(self) -> None:
        """The 48-bit prefix is the current Unix time in ms; later batches sort later."""
        before = time.time_ns() // 1_000_000
        first = new_task_ids(100)
        time.sleep(0.003)
        second = new_task_ids(100)
        after = time.time_ns() // 1_000_000
        stamps = [uuid.UUID(task_id).int >> 80 for task_id in first + second]
        assert all(before <= stamp <= after for stamp in stamps)
        assert max(stamps[:100]) < min(stamps[100:])

    def test_the_request_numbers_every_task_and_keeps_given_ids(self) -> None:
        """A Task's own id is sent as is; the others get fresh, distinct ids."""
        given = str(uuid.uuid4())
        tasks = [Task(type="a"), Task(type="a", id=given), Task(type="a")]
        ids = [spec.id for spec in enqueue_request(tasks).tasks]
        assert ids[1] == given
        assert len(set(ids)) == 3


class TestFastInsert:
    def test_a_batch_is_stored_in_order_with_its_history(self, task_stub, db) -> None:
        """1000 new tasks: all created, queued in batch order, one enqueued event each."""
        specs = [spec(payload=str(i).encode()) for i in range(BATCH)]
        response = enqueue(task_stub, specs)
        ids = [s.id for s in specs]
        assert list(response.task_ids) == ids
        assert list(response.created) == [True] * BATCH
        assert stored_in_order(db) == ids
        assert enqueued_events(db) == dict.fromkeys(ids, 1)
        payloads = {
            str(row["id"]): bytes(row["payload"])
            for row in db.fetch("SELECT id, payload FROM conveyor_tasks")
        }
        assert [payloads[task_id] for task_id in ids] == [s.payload for s in specs]

    def test_different_fields_per_task_are_kept_apart(self, task_stub, db) -> None:
        """A batch whose tasks differ in every field stores each task's own values."""
        specs = [
            spec(
                type=f"bulk.t{i % 3}",
                payload=bytes([i % 256]) * (i % 5),
                timeout=Duration(seconds=10 + i % 7, nanos=(i % 2) * 500_000_000),
                max_retries=i % 4,
                trace_context={"traceparent": f"00-{i % 2:032x}-{1:016x}-01"} if i % 3 else {},
            )
            for i in range(200)
        ]
        enqueue(task_stub, specs)
        rows = {
            str(row["id"]): row
            for row in db.fetch(
                "SELECT id, type, payload, timeout, max_retries, trace_context::text AS trace "
                "FROM conveyor_tasks"
            )
        }
        for s in specs:
            row = rows[s.id]
            assert row["type"] == s.type
            assert bytes(row["payload"]) == s.payload
            assert row["timeout"] == s.timeout.ToTimedelta()
            assert row["max_retries"] == s.max_retries
            expected = dict(s.trace_context) or None
            assert (json.loads(row["trace"]) if row["trace"] else None) == expected

    def test_uniform_fields_apply_to_every_task(self, database_url) -> None:
        """task_insert_many with one type, payload, timeout... for 100 tasks stores each."""

        async def go() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(database_url)
            try:
                ids = new_task_ids(100)
                await conn.fetchval(
                    queries.SQL["task_insert_many"],
                    ids,
                    ["same"],
                    [b"p"],
                    [12.5],
                    [7],
                    ['{"traceparent": "x"}'],
                )
                return list(
                    await conn.fetch(
                        "SELECT type, payload, timeout, max_retries, trace_context->>'traceparent'"
                        " AS trace FROM conveyor_tasks"
                    )
                )
            finally:
                await conn.close()

        rows = asyncio.run(go())
        assert len(rows) == 100
        assert {
            (r["type"], bytes(r["payload"]), r["timeout"], r["max_retries"], r["trace"])
            for r in rows
        } == {("same", b"p", timedelta(seconds=12.5), 7, "x")}

    def test_the_new_tasks_wake_listeners_once_with_no_payload(self, task_stub, database_url):
        """One bulk insert sends one empty NOTIFY on conveyor_task_ready; a full repeat none."""

        async def go() -> tuple[list[str], list[str]]:
            conn = await asyncpg.connect(database_url)
            received: list[str] = []
            await conn.add_listener("conveyor_task_ready", lambda *args: received.append(args[3]))
            try:
                specs = [spec() for _ in range(300)]
                await asyncio.to_thread(enqueue, task_stub, specs)
                await asyncio.sleep(0.5)
                first = list(received)
                received.clear()
                await asyncio.to_thread(enqueue, task_stub, specs)
                await asyncio.sleep(0.5)
                return first, list(received)
            finally:
                await conn.close()

        first, repeat = asyncio.run(go())
        assert first == [""]
        assert repeat == []


class TestTakenAndRepeatedIds:
    def test_a_repeated_batch_creates_nothing(self, task_stub, db) -> None:
        """Sending the same 1000 tasks again (a retried call) answers created=False for all."""
        specs = [spec() for _ in range(BATCH)]
        enqueue(task_stub, specs)
        again = enqueue(task_stub, specs)
        assert list(again.task_ids) == [s.id for s in specs]
        assert list(again.created) == [False] * BATCH
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == BATCH
        assert db.fetchval("SELECT count(*) FROM conveyor_task_history") == BATCH

    def test_taken_ids_in_a_new_batch_are_skipped_in_place(self, task_stub, db) -> None:
        """Every third id already exists: those are skipped, the rest created in order."""
        old = [spec() for _ in range(100)]
        enqueue(task_stub, old)
        mixed = [old[i // 3] if i % 3 == 0 else spec() for i in range(300)]
        response = enqueue(task_stub, mixed)
        assert list(response.created) == [i % 3 != 0 for i in range(300)]
        new_ids = [s.id for i, s in enumerate(mixed) if i % 3]
        assert stored_in_order(db) == [s.id for s in old] + new_ids
        assert enqueued_events(db) == dict.fromkeys([s.id for s in old] + new_ids, 1)
        # The first enqueue is untouched by the repeat.
        assert db.fetchval("SELECT count(DISTINCT type) FROM conveyor_tasks") == 1

    def test_a_repeated_id_within_a_large_batch_is_created_once(self, task_stub, db) -> None:
        """Entries 10 and 500 share an id: the first is created, the second is not."""
        specs = [spec() for _ in range(BATCH)]
        specs[500] = specs[10]
        response = enqueue(task_stub, specs)
        created = list(response.created)
        assert created[10] is True
        assert created[500] is False
        assert created.count(False) == 1
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == BATCH - 1
        assert enqueued_events(db)[specs[10].id] == 1

    def test_only_created_tasks_are_counted(self, server, task_stub) -> None:
        """conveyor_tasks_enqueued_total counts what a bulk call created, per type."""
        specs = [spec(type="bulk.count") for _ in range(150)]
        enqueue(task_stub, specs[:50])
        enqueue(task_stub, specs)
        with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as response:  # noqa: S310
            body = response.read().decode()
        assert 'conveyor_tasks_enqueued_total{type="bulk.count"} 150.0' in body

    def test_concurrent_bulk_calls_sharing_ids_create_each_once(self, server, db) -> None:
        """Eight calls at once over overlapping ids: each id created by exactly one call."""
        pool = new_task_ids(1500)
        batches = [pool[i * 150 : i * 150 + 400] for i in range(8)]

        async def go() -> list[list[bool]]:
            channel = grpc.aio.insecure_channel(server.address)
            stub = pb_grpc.TaskServiceStub(channel)

            async def call(batch: list[str]) -> pb.EnqueueTasksResponse:
                # Statements inserting the same ids in different orders can deadlock;
                # PostgreSQL aborts one, which the server answers UNAVAILABLE (nothing of
                # it was written) and the clients retry. So does this raw caller.
                for _ in range(10):
                    try:
                        return await stub.EnqueueTasks(
                            pb.EnqueueTasksRequest(tasks=[spec(i) for i in batch]), timeout=30
                        )
                    except grpc.aio.AioRpcError as error:
                        if error.code() != grpc.StatusCode.UNAVAILABLE:
                            raise
                raise AssertionError("still UNAVAILABLE after 10 attempts")

            try:
                responses = await asyncio.gather(*(call(batch) for batch in batches))
            finally:
                await channel.close()
            return [list(r.created) for r in responses]

        created = asyncio.run(go())
        made = [
            task_id
            for batch, flags in zip(batches, created, strict=True)
            for task_id, flag in zip(batch, flags, strict=True)
            if flag
        ]
        distinct = {task_id for batch in batches for task_id in batch}
        assert sorted(made) == sorted(distinct)
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == len(distinct)
        assert enqueued_events(db) == dict.fromkeys(distinct, 1)


class TestStatements:
    async def test_the_fast_insert_inserts_nothing_when_an_id_is_taken(self, database_url):
        """task_insert_many fails as a whole on a taken id; task_insert_many (the function)
        then skips just that one."""
        conn = await asyncpg.connect(database_url)
        try:
            first = [new_task(task_id) for task_id in new_task_ids(100)]
            assert await queries.task_insert_many(conn, first) == [True] * 100
            batch = [new_task(task_id) for task_id in new_task_ids(100)]
            batch[42] = first[7]
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.fetchval(
                    queries.SQL["task_insert_many"],
                    [t.id for t in batch],
                    ["bulk.t"],
                    [b""],
                    [60.0],
                    [3],
                    [None],
                )
            assert await conn.fetchval("SELECT count(*) FROM conveyor_tasks") == 100
            created = await queries.task_insert_many(conn, batch)
            assert created == [i != 42 for i in range(100)]
            assert await conn.fetchval("SELECT count(*) FROM conveyor_tasks") == 199
            assert await conn.fetchval("SELECT count(*) FROM conveyor_task_history") == 199
        finally:
            await conn.close()

    async def test_inside_a_transaction_a_taken_id_does_not_abort_it(self, database_url):
        """In the caller's transaction the function skips taken ids without failing it."""
        conn = await asyncpg.connect(database_url)
        try:
            first = [new_task(task_id) for task_id in new_task_ids(100)]
            await queries.task_insert_many(conn, first)
            async with conn.transaction():
                batch = [*first[:1], *(new_task(i) for i in new_task_ids(99))]
                created = await queries.task_insert_many(conn, batch)
                assert created == [False] + [True] * 99
                assert await conn.fetchval("SELECT count(*) FROM conveyor_tasks") == 199
        finally:
            await conn.close()

    async def test_a_lone_task_is_stored_whole_once_and_wakes_the_polls_once(self, database_url):
        """One task goes through task_insert_one: every field stored as given, a repeat of
        its id creates nothing and changes nothing, and only the insert that created it
        sends the wake-up."""
        conn = await asyncpg.connect(database_url)
        listener = await asyncpg.connect(database_url)
        heard: asyncio.Queue[str] = asyncio.Queue()
        # Callbacks get (connection, pid, channel, payload); the wake-up's payload is empty.
        await listener.add_listener("conveyor_task_ready", lambda *args: heard.put_nowait(args[3]))
        try:
            trace = json.dumps({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
            lone = queries.NewTask(
                id=new_task_ids(1)[0],
                type="bulk.lone",
                payload=b"\x00lone",
                timeout=timedelta(seconds=42.5),
                max_retries=7,
                trace_context=trace,
            )
            assert await queries.task_insert_many(conn, [lone]) == [True]
            assert await asyncio.wait_for(heard.get(), timeout=10) == ""
            again = queries.NewTask(lone.id, "bulk.other", b"other", timedelta(seconds=1), 0)
            assert await queries.task_insert_many(conn, [again]) == [False]
            row = await conn.fetchrow(
                "SELECT type, payload, timeout, max_retries, trace_context::text AS trace, "
                "state::text AS state FROM conveyor_tasks WHERE id = $1",
                uuid.UUID(lone.id),
            )
            assert dict(row) == {
                "type": "bulk.lone",
                "payload": b"\x00lone",
                "timeout": timedelta(seconds=42.5),
                "max_retries": 7,
                "trace": trace,
                "state": "queued",
            }
            # A statement after the repeat, so its wake-up, had it sent one, came first.
            await conn.execute("SELECT pg_notify('conveyor_task_ready', 'marker')")
            assert await asyncio.wait_for(heard.get(), timeout=10) == "marker"
        finally:
            await listener.close()
            await conn.close()

    def test_columns_read_back_as_rows(self) -> None:
        """NewTasks is a sequence of NewTask rows; concat joins batches in order."""
        rows = [new_task(task_id) for task_id in new_task_ids(3)]
        batch = queries.NewTasks.of(rows)
        assert list(batch) == rows
        assert list(batch[1:]) == rows[1:]
        assert list(queries.NewTasks.concat([batch, rows[:1]])) == [*rows, rows[0]]


def new_task(task_id: str) -> queries.NewTask:
    return queries.NewTask(
        id=task_id, type="bulk.t", payload=b"", timeout=timedelta(seconds=60), max_retries=3
    )


class TestValidation:
    def test_a_bad_task_deep_in_a_batch_is_named_and_nothing_is_stored(self, task_stub, db) -> None:
        """Task 700 of 1000 has a bad type: INVALID_ARGUMENT naming tasks[700]; no row."""
        specs = [spec() for _ in range(BATCH)]
        specs[700] = spec(type="bad type")
        with pytest.raises(grpc.RpcError) as caught:
            enqueue(task_stub, specs)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "tasks[700]" in caught.value.details()
        assert "type" in caught.value.details()
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == 0

    @pytest.mark.parametrize(
        ("bad", "words"),
        [
            ({"timeout": None}, "timeout is required"),
            ({"timeout": Duration(seconds=0)}, "positive"),
            ({"timeout": Duration(seconds=8 * 24 * 3600)}, "at most"),
            ({"max_retries": 1001}, "max_retries"),
            ({"id": ""}, "id is required"),
            ({"id": "not-a-uuid"}, "malformed task id"),
            ({"trace_context": {"k": "v" * 600}}, "too long"),
        ],
        ids=["no-timeout", "zero-timeout", "long-timeout", "retries", "no-id", "bad-id", "trace"],
    )
    def test_each_kind_of_bad_task_is_reported_in_a_large_batch(
        self, task_stub, db, bad: dict[str, Any], words: str
    ) -> None:
        """The batch path gives the same message as a single bad task, with its index."""
        specs = [spec() for _ in range(300)]
        fields = {"id": specs[123].id, "type": "bulk.t", "max_retries": 3, **bad}
        if "timeout" not in bad:
            fields["timeout"] = Duration(seconds=60)
        specs[123] = pb.TaskSpec(**{k: v for k, v in fields.items() if v is not None})
        with pytest.raises(grpc.RpcError) as caught:
            enqueue(task_stub, specs)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "tasks[123]" in caught.value.details()
        assert words in caught.value.details()
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == 0

    def test_a_payload_over_the_limit_in_a_large_batch(self, start_server, db) -> None:
        """The server's payload limit applies to every task of a batch."""
        server = start_server(max_payload_bytes=100)
        tasks = [Task(type="bulk.t", payload=b"x" * 100) for _ in range(200)]
        tasks[150] = Task(type="bulk.t", payload=b"x" * 101)
        with Client(server.address) as client, pytest.raises(InvalidTask) as caught:
            client.enqueue_tasks(tasks)
        assert "100" in caught.value.message
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == 0

    def test_ids_in_other_uuid_spellings_are_stored_canonical(self, task_stub, db) -> None:
        """Upper-case and brace-wrapped ids are valid: answered and stored canonically."""
        canonical = new_task_ids(200)
        sent = [
            task_id.upper() if i % 2 else "{" + task_id + "}" for i, task_id in enumerate(canonical)
        ]
        response = enqueue(task_stub, [spec(task_id) for task_id in sent])
        assert list(response.task_ids) == canonical
        assert stored_in_order(db) == canonical

    def test_a_type_the_database_refuses_is_still_refused(self, db) -> None:
        """The cheaper CHECK (migration 0006) keeps the rule: 1-128 of [A-Za-z0-9_.:-]."""
        insert = (
            "INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries) "
            "VALUES (gen_random_uuid(), $1, '', interval '1 minute', 0)"
        )
        db.execute(insert, "a" * 128)
        db.execute(insert, "Aa0_.:-")
        for bad in ("", "a" * 129, "has space", "bad!", "é", "a\nb"):
            with pytest.raises(asyncpg.CheckViolationError):
                db.execute(insert, bad)
        with pytest.raises(asyncpg.CheckViolationError):
            db.execute("INSERT INTO conveyor_paused_types (type) VALUES ($1)", "a" * 129)


class TestClients:
    async def test_async_client_sends_2500_tasks_as_three_calls_in_order(
        self, server, database_url
    ) -> None:
        """More than 1000 tasks go in requests of at most 1000; ids come back in order."""
        tasks = [Task(type="bulk.t", payload=str(i).encode()) for i in range(2500)]
        async with AsyncClient(server.address) as client:
            ids = await client.enqueue_tasks(tasks)
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch("SELECT id, payload FROM conveyor_tasks ORDER BY seq")
        finally:
            await conn.close()
        assert [str(r["id"]) for r in rows] == ids
        assert [bytes(r["payload"]) for r in rows] == [t.payload for t in tasks]

    def test_sync_client_keeps_given_ids_and_timeouts(self, client: Client, db) -> None:
        """Given ids, timeouts and retries reach the database as the tasks said."""
        tasks = [
            Task(type="bulk.t", id=str(uuid.uuid4()), timeout=5 + i % 3, max_retries=i % 2)
            for i in range(100)
        ]
        assert client.enqueue_tasks(tasks) == [t.id for t in tasks]
        rows = {
            str(r["id"]): r for r in db.fetch("SELECT id, timeout, max_retries FROM conveyor_tasks")
        }
        for task in tasks:
            assert rows[task.id]["timeout"] == task.timeout
            assert rows[task.id]["max_retries"] == task.max_retries


class TestLargePayloads:
    def test_a_batch_larger_than_a_grpc_message_is_split_by_size(self, client: Client, db) -> None:
        """20 tasks of 1 MiB (each within the server's limit, 20 MiB together: more than a
        server accepts in one message) are sent in several requests, and all arrive in
        order."""
        tasks = [Task(type="bulk.big", payload=bytes([i]) * (1024 * 1024)) for i in range(20)]
        ids = client.enqueue_tasks(tasks)
        rows = db.fetch("SELECT id, get_byte(payload, 0) AS first FROM conveyor_tasks ORDER BY seq")
        assert [str(r["id"]) for r in rows] == ids
        assert [r["first"] for r in rows] == list(range(20))

    def test_requests_stay_under_the_size_bound(self) -> None:
        """enqueue_batches cuts at MAX_BATCH tasks and at about MAX_REQUEST_BYTES."""
        tasks = [Task(type="bulk.big", payload=b"x" * 10_000) for _ in range(3000)]
        requests = enqueue_batches(tasks)
        assert sum(len(r.tasks) for r in requests) == 3000
        assert all(r.ByteSize() <= MAX_REQUEST_BYTES for r in requests)
        assert all(len(r.tasks) <= MAX_BATCH for r in requests)
        assert [s.payload for r in requests for s in r.tasks] == [t.payload for t in tasks]
        assert [len(r.tasks) for r in enqueue_batches([Task(type="a")] * 2500)] == [1000, 1000, 500]
