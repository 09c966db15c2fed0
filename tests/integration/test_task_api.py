"""The producers' API (enqueue, status, cancel) through `Client`, `AsyncClient` and raw gRPC.

Bad input must surface as a typed error wherever it is caught: in `Task(...)` before any
network call, in the client before a malformed id is sent, and at the server for whatever
arrives on the wire (INVALID_ARGUMENT / NOT_FOUND with a one-line message, never a trace).
"""

from __future__ import annotations

import asyncio
import gc
import time
import urllib.request
import uuid
import weakref
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import succeed_as_a_worker

import conveyor
from conveyor import (
    AsyncClient,
    Client,
    ConveyorError,
    RetryPolicy,
    Task,
    TaskState,
    Worker,
)
from conveyor.breaker import BreakerPolicy
from conveyor.errors import (
    CircuitOpen,
    ConfigError,
    InvalidTask,
    ServerUnavailable,
    TaskAlreadyFinished,
    TaskNotFound,
)
from conveyor.protocol.v1 import conveyor_pb2 as pb


def is_uuid(value: object) -> bool:
    """Whether `value` is a string in canonical UUID form."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


async def fetch(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """`Db.fetch` for async tests (Db runs its own event loop, which cannot nest)."""
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def rpc_error(call: Any, request: Any) -> grpc.RpcError:
    """Make a raw gRPC call that must fail; return its error."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    return caught.value


def assert_clean_status(error: grpc.RpcError, code: grpc.StatusCode) -> str:
    """The status is `code` with a non-empty, one-line, traceback-free message."""
    assert error.code() is code, f"{error.code()}: {error.details()}"
    details = error.details()
    assert details
    assert details.strip()
    assert "Traceback" not in details
    assert 'File "' not in details
    return details


def spec(**fields: Any) -> pb.TaskSpec:
    """A valid TaskSpec unless `fields` override something."""
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": "raw.task",
        "payload": b"p",
        "timeout": Duration(seconds=30),
        "max_retries": 2,
    }
    values.update(fields)
    return pb.TaskSpec(**{name: value for name, value in values.items() if value is not None})


# --- enqueue ----------------------------------------------------------------------------


class TestEnqueueReturnsId:
    def test_sync_enqueue_returns_a_uuid_string(self, client: Client, db) -> None:
        """Client.enqueue_task returns the new task's id as a canonical UUID string."""
        task_id = client.enqueue_task(Task(type="email.send", payload=b"hi"))
        assert is_uuid(task_id)
        assert uuid.UUID(task_id).version == 7
        assert db.task(task_id)["type"] == "email.send"

    async def test_async_enqueue_returns_a_uuid_string(self, server, database_url) -> None:
        """AsyncClient.enqueue_task returns the new task's id as a canonical UUID string."""
        async with AsyncClient(server.address) as client:
            task_id = await client.enqueue_task(Task(type="email.send", payload=b"hi"))
        assert is_uuid(task_id)
        rows = await fetch(database_url, "SELECT type FROM conveyor_tasks WHERE id = $1", task_id)
        assert [row["type"] for row in rows] == ["email.send"]

    def test_client_given_id_is_kept(self, client: Client) -> None:
        """A task enqueued with an explicit id is stored under exactly that id."""
        wanted = str(uuid.uuid4())
        assert client.enqueue_task(Task(type="t", id=wanted)) == wanted


class TestEnqueueIsIdempotent:
    def test_sync_same_id_twice_creates_one_row(self, client: Client, db) -> None:
        """Enqueueing the same Task(id=...) twice returns that id both times and stores one row."""
        task = Task(type="report.build", payload=b"1", id=str(uuid.uuid4()))
        first = client.enqueue_task(task)
        second = client.enqueue_task(task)
        assert first == second == task.id
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE id = $1::uuid", task.id) == 1
        assert [event["event"] for event in db.events(task.id)] == ["enqueued"]

    async def test_async_same_id_twice_creates_one_row(self, server, database_url) -> None:
        """AsyncClient: enqueueing the same id twice returns it twice and stores one row."""
        task = Task(type="report.build", payload=b"1", id=str(uuid.uuid4()))
        async with AsyncClient(server.address) as client:
            first = await client.enqueue_task(task)
            second = await client.enqueue_task(task)
        assert first == second == task.id
        rows = await fetch(database_url, "SELECT id FROM conveyor_tasks")
        assert [str(row["id"]) for row in rows] == [task.id]

    def test_repeat_does_not_overwrite_the_first_task(self, client: Client, db) -> None:
        """A repeat with the same id but another payload leaves the original task as it was."""
        task_id = str(uuid.uuid4())
        client.enqueue_task(Task(type="first", payload=b"original", id=task_id))
        client.enqueue_task(Task(type="second", payload=b"changed", id=task_id))
        row = db.task(task_id)
        assert (row["type"], bytes(row["payload"])) == ("first", b"original")


class TestDuplicateIdsInOneBatch:
    def test_duplicate_in_one_batch_creates_one_task(self, client: Client, db) -> None:
        """enqueue_tasks([task, task]) returns the id twice and stores one row, one event."""
        task = Task(type="dup", id=str(uuid.uuid4()))
        assert client.enqueue_tasks([task, task]) == [task.id, task.id]
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == 1
        assert [event["event"] for event in db.events(task.id)] == ["enqueued"]

    def test_duplicate_in_one_batch_is_reported_created_once(self, task_stub) -> None:
        """EnqueueTasks with one id twice says created for exactly one of the two entries."""
        task = spec()
        response = task_stub.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[task, task]), timeout=10)
        assert list(response.task_ids) == [task.id, task.id]
        assert list(response.created) == [True, False]

    def test_duplicate_in_one_batch_is_counted_once(self, server, client: Client) -> None:
        """conveyor_tasks_enqueued_total counts one task for one id sent twice in a batch."""
        task = Task(type="dup.metric", id=str(uuid.uuid4()))
        client.enqueue_tasks([task, task])
        with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as response:  # noqa: S310
            body = response.read().decode()
        assert 'conveyor_tasks_enqueued_total{type="dup.metric"} 1.0' in body


class TestEnqueueMany:
    def test_sync_500_tasks_ids_in_order(self, client: Client, db) -> None:
        """enqueue_tasks of 500 tasks returns 500 ids in input order, and every task exists."""
        tasks = [Task(type="bulk", payload=str(i).encode()) for i in range(500)]
        ids = client.enqueue_tasks(tasks)
        assert len(ids) == 500
        assert len(set(ids)) == 500
        stored = {
            str(row["id"]): bytes(row["payload"])
            for row in db.fetch("SELECT id, payload FROM conveyor_tasks")
        }
        assert len(stored) == 500
        assert [stored[task_id] for task_id in ids] == [task.payload for task in tasks]

    async def test_async_500_tasks_ids_in_order(self, server, database_url) -> None:
        """AsyncClient.enqueue_tasks of 500 tasks returns ids in input order; all exist."""
        tasks = [Task(type="bulk", payload=str(i).encode()) for i in range(500)]
        async with AsyncClient(server.address) as client:
            ids = await client.enqueue_tasks(tasks)
        rows = await fetch(database_url, "SELECT id, payload FROM conveyor_tasks")
        stored = {str(row["id"]): bytes(row["payload"]) for row in rows}
        assert len(ids) == len(stored) == 500
        assert [stored[task_id] for task_id in ids] == [task.payload for task in tasks]


# --- status -----------------------------------------------------------------------------


def check_fresh_status(status: Any, task_id: str) -> None:
    """The status of a task just enqueued as Task(type='status.check', timeout=42, ...)."""
    assert status.id == task_id
    assert status.type == "status.check"
    assert status.state is TaskState.QUEUED
    assert status.worker_id is None
    assert status.attempts == 0
    assert status.max_retries == 7
    assert status.timeout == timedelta(seconds=42)
    assert isinstance(status.created_at, datetime)
    assert status.created_at.tzinfo is not None
    assert status.created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - status.created_at) < timedelta(minutes=1)
    assert status.started_at is None
    assert status.finished_at is None
    assert status.result is None
    assert status.last_error is None


class TestGetTaskStatus:
    def test_sync_fields_of_a_queued_task(self, client: Client) -> None:
        """A queued task reports its type, QUEUED, no worker, 0 attempts, retries and timeout."""
        task_id = client.enqueue_task(Task(type="status.check", timeout=42, max_retries=7))
        check_fresh_status(client.get_task_status(task_id), task_id)

    async def test_async_fields_of_a_queued_task(self, server) -> None:
        """AsyncClient reports the same fields for a queued task."""
        async with AsyncClient(server.address) as client:
            task_id = await client.enqueue_task(
                Task(type="status.check", timeout=42, max_retries=7)
            )
            status = await client.get_task_status(task_id)
        check_fresh_status(status, task_id)

    def test_no_history_unless_asked(self, client: Client) -> None:
        """Without history=True the status carries no events."""
        task_id = client.enqueue_task(Task(type="t"))
        assert client.get_task_status(task_id).history == ()


class TestHistory:
    def test_sync_history_has_the_enqueued_event(self, client: Client) -> None:
        """history=True returns exactly the 'enqueued' event (state queued, attempt 0)."""
        task_id = client.enqueue_task(Task(type="t"))
        status = client.get_task_status(task_id, history=True)
        assert [(e.event, e.state, e.attempt) for e in status.history] == [
            ("enqueued", TaskState.QUEUED, 0)
        ]
        assert status.history[0].at == status.created_at

    async def test_async_history_has_the_enqueued_event(self, server) -> None:
        """AsyncClient with history=True returns the 'enqueued' event."""
        async with AsyncClient(server.address) as client:
            task_id = await client.enqueue_task(Task(type="t"))
            status = await client.get_task_status(task_id, history=True)
        assert [(e.event, e.state) for e in status.history] == [("enqueued", TaskState.QUEUED)]


# --- typed errors -----------------------------------------------------------------------


class TestTaskValidation:
    @pytest.mark.parametrize(
        ("fields", "field"),
        [
            ({"type": ""}, "type"),
            ({"type": "x" * 129}, "type"),
            ({"type": "has space"}, "type"),
            ({"type": "t", "timeout": -1}, "timeout"),
            ({"type": "t", "timeout": 0}, "timeout"),
            ({"type": "t", "timeout": timedelta(0)}, "timeout"),
            ({"type": "t", "max_retries": -1}, "max_retries"),
            ({"type": "t", "id": "not-a-uuid"}, "id"),
        ],
        ids=[
            "empty-type",
            "129-char-type",
            "type-with-space",
            "negative-timeout",
            "zero-timeout",
            "zero-timedelta",
            "negative-retries",
            "malformed-id",
        ],
    )
    def test_bad_task_is_rejected_by_the_constructor(self, fields, field) -> None:
        """Task(...) itself raises InvalidTask naming the bad field, before any network call."""
        with pytest.raises(InvalidTask) as caught:
            Task(**fields)
        assert caught.value.field == field
        assert caught.value.message

    def test_128_char_type_is_accepted(self) -> None:
        """The type-length limit is inclusive: 128 characters is fine."""
        assert Task(type="x" * 128).type == "x" * 128


class TestUnknownTask:
    def test_sync_get_unknown_id_raises_task_not_found(self, client: Client) -> None:
        """get_task_status of a valid but unknown UUID raises TaskNotFound."""
        with pytest.raises(TaskNotFound):
            client.get_task_status(str(uuid.uuid4()))

    def test_sync_cancel_unknown_id_raises_task_not_found(self, client: Client) -> None:
        """cancel_task of a valid but unknown UUID raises TaskNotFound."""
        with pytest.raises(TaskNotFound):
            client.cancel_task(str(uuid.uuid4()))

    async def test_async_unknown_id_raises_task_not_found(self, server) -> None:
        """AsyncClient raises TaskNotFound for get and cancel of an unknown UUID."""
        async with AsyncClient(server.address) as client:
            with pytest.raises(TaskNotFound):
                await client.get_task_status(str(uuid.uuid4()))
            with pytest.raises(TaskNotFound):
                await client.cancel_task(str(uuid.uuid4()))


class TestMalformedId:
    def test_sync_malformed_id_raises_invalid_task(self, client: Client) -> None:
        """get_task_status and cancel_task of 'not-a-uuid' raise InvalidTask."""
        with pytest.raises(InvalidTask):
            client.get_task_status("not-a-uuid")
        with pytest.raises(InvalidTask):
            client.cancel_task("not-a-uuid")

    async def test_async_malformed_id_raises_invalid_task(self, server) -> None:
        """AsyncClient: get_task_status and cancel_task of 'not-a-uuid' raise InvalidTask."""
        async with AsyncClient(server.address) as client:
            with pytest.raises(InvalidTask):
                await client.get_task_status("not-a-uuid")
            with pytest.raises(InvalidTask):
                await client.cancel_task("not-a-uuid")


class TestPayloadLimit:
    def test_sync_payload_over_the_limit_names_the_limit(self, start_server, db) -> None:
        """A 1025-byte payload on a 1024-byte server raises InvalidTask naming 1024; no row."""
        server = start_server(max_payload_bytes=1024)
        with Client(server.address) as client:
            with pytest.raises(InvalidTask) as caught:
                client.enqueue_task(Task(type="big", payload=b"x" * 1025))
            assert "1024" in caught.value.message
            assert "1025" in caught.value.message
            assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == 0
            # The limit is inclusive.
            accepted = client.enqueue_task(Task(type="big", payload=b"x" * 1024))
        assert len(bytes(db.task(accepted)["payload"])) == 1024

    async def test_async_payload_over_the_limit_names_the_limit(self, start_server) -> None:
        """AsyncClient gets the same InvalidTask naming the server's limit."""
        server = start_server(max_payload_bytes=1024)
        async with AsyncClient(server.address) as client:
            with pytest.raises(InvalidTask) as caught:
                await client.enqueue_task(Task(type="big", payload=b"x" * 1025))
        assert "1024" in caught.value.message

    def test_one_bad_task_rejects_the_whole_batch(self, start_server, db) -> None:
        """A batch with one oversized payload is refused as a whole: no task is created."""
        server = start_server(max_payload_bytes=1024)
        with Client(server.address) as client, pytest.raises(InvalidTask):
            client.enqueue_tasks([Task(type="ok"), Task(type="big", payload=b"x" * 1025)])
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == 0


class TestRawEnqueueValidation:
    @pytest.mark.parametrize(
        "tasks",
        [
            [spec(type="")],
            [spec(type="bad!")],
            [spec(type="x" * 129)],
            [spec(type="has space")],
            [spec(timeout=None)],
            [spec(timeout=Duration(seconds=-5))],
            [spec(timeout=Duration(seconds=0))],
            [spec(timeout=Duration(seconds=8 * 24 * 3600))],
            [spec(timeout=Duration(seconds=2**62))],
            [spec(max_retries=1001)],
            [spec(id="not-a-uuid")],
            [spec(id="")],
            [spec(), spec(type="bad!")],
            [],
        ],
        ids=[
            "empty-type",
            "type-with-bang",
            "129-char-type",
            "type-with-space",
            "no-timeout",
            "negative-timeout",
            "zero-timeout",
            "timeout-over-7-days",
            "timeout-beyond-duration-range",
            "1001-retries",
            "malformed-id",
            "missing-id",
            "second-task-bad",
            "empty-list",
        ],
    )
    def test_bad_enqueue_is_invalid_argument(self, task_stub, db, tasks) -> None:
        """EnqueueTasks with bad input answers INVALID_ARGUMENT with a clean message; no row."""
        error = rpc_error(task_stub.EnqueueTasks, pb.EnqueueTasksRequest(tasks=tasks))
        assert_clean_status(error, grpc.StatusCode.INVALID_ARGUMENT)
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == 0

    def test_message_names_the_bad_task(self, task_stub) -> None:
        """The message says which task of the batch was wrong."""
        request = pb.EnqueueTasksRequest(tasks=[spec(), spec(type="bad!")])
        details = assert_clean_status(
            rpc_error(task_stub.EnqueueTasks, request), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert "tasks[1]" in details

    def test_valid_raw_enqueue_reports_created(self, task_stub) -> None:
        """A valid raw enqueue returns the id and created=True, then created=False on repeat."""
        task = spec()
        first = task_stub.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[task]), timeout=10)
        second = task_stub.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[task]), timeout=10)
        assert list(first.task_ids) == list(second.task_ids) == [task.id]
        assert (list(first.created), list(second.created)) == ([True], [False])


class TestRawGetAndCancelValidation:
    def test_get_unknown_id_is_not_found(self, task_stub) -> None:
        """GetTask of a valid but unknown UUID answers NOT_FOUND."""
        missing = str(uuid.uuid4())
        error = rpc_error(task_stub.GetTask, pb.GetTaskRequest(task_id=missing))
        assert missing in assert_clean_status(error, grpc.StatusCode.NOT_FOUND)

    def test_get_malformed_id_is_invalid_argument(self, task_stub) -> None:
        """GetTask of 'not-a-uuid' answers INVALID_ARGUMENT."""
        error = rpc_error(task_stub.GetTask, pb.GetTaskRequest(task_id="not-a-uuid"))
        assert_clean_status(error, grpc.StatusCode.INVALID_ARGUMENT)

    def test_get_empty_id_is_invalid_argument(self, task_stub) -> None:
        """GetTask with no id at all answers INVALID_ARGUMENT."""
        error = rpc_error(task_stub.GetTask, pb.GetTaskRequest())
        assert_clean_status(error, grpc.StatusCode.INVALID_ARGUMENT)

    def test_cancel_unknown_id_is_not_found(self, task_stub) -> None:
        """CancelTask of a valid but unknown UUID answers NOT_FOUND."""
        error = rpc_error(task_stub.CancelTask, pb.CancelTaskRequest(task_id=str(uuid.uuid4())))
        assert_clean_status(error, grpc.StatusCode.NOT_FOUND)

    def test_cancel_malformed_id_is_invalid_argument(self, task_stub) -> None:
        """CancelTask of 'not-a-uuid' answers INVALID_ARGUMENT."""
        error = rpc_error(task_stub.CancelTask, pb.CancelTaskRequest(task_id="not-a-uuid"))
        assert_clean_status(error, grpc.StatusCode.INVALID_ARGUMENT)


class TestCancel:
    def test_sync_cancel_queued_task(self, client: Client, db) -> None:
        """cancel_task on a queued task returns it CANCELLED and records one 'cancelled' event."""
        task_id = client.enqueue_task(Task(type="t"))
        status = client.cancel_task(task_id)
        assert status.state is TaskState.CANCELLED
        assert status.finished_at is not None
        assert db.task(task_id)["state"] == "cancelled"

    async def test_async_cancel_queued_task(self, server) -> None:
        """AsyncClient.cancel_task on a queued task returns it CANCELLED."""
        async with AsyncClient(server.address) as client:
            task_id = await client.enqueue_task(Task(type="t"))
            status = await client.cancel_task(task_id)
            again = await client.get_task_status(task_id)
        assert status.state is again.state is TaskState.CANCELLED

    def test_cancelling_twice_is_a_no_op(self, client: Client, db) -> None:
        """Cancelling a cancelled task returns it unchanged and adds no second event."""
        task_id = client.enqueue_task(Task(type="t"))
        first = client.cancel_task(task_id)
        second = client.cancel_task(task_id)
        assert second.state is TaskState.CANCELLED
        assert second.finished_at == first.finished_at
        assert [event["event"] for event in db.events(task_id)] == ["enqueued", "cancelled"]

    def test_cancelling_a_finished_task_raises(self, server, client: Client) -> None:
        """cancel_task on a succeeded task raises TaskAlreadyFinished and leaves it succeeded."""
        task_id = client.enqueue_task(Task(type="finish.me"))
        succeed_as_a_worker(server.address, "finish.me")
        with pytest.raises(TaskAlreadyFinished) as caught:
            client.cancel_task(task_id)
        assert "succeeded" in caught.value.message
        # The attributes too, though only the message crosses the wire (test_error_context).
        assert (caught.value.task_id, caught.value.state) == (task_id, "succeeded")
        assert client.get_task_status(task_id).state is TaskState.SUCCEEDED


# --- connection ---------------------------------------------------------------------------


FAST_GIVE_UP = RetryPolicy(
    total_timeout=timedelta(seconds=1), call_timeout=timedelta(milliseconds=300)
)


class TestUnreachableServer:
    def test_sync_client_gives_up_with_server_unavailable(self) -> None:
        """A Client pointed at a closed port raises ServerUnavailable within its total timeout."""
        started = time.monotonic()
        with (
            Client("127.0.0.1:1", retry=FAST_GIVE_UP) as client,
            pytest.raises(ServerUnavailable) as caught,
        ):
            client.enqueue_task(Task(type="t"))
        elapsed = time.monotonic() - started
        assert elapsed < 5
        assert "127.0.0.1:1" in caught.value.message

    async def test_async_client_gives_up_with_server_unavailable(self) -> None:
        """An AsyncClient pointed at a closed port raises ServerUnavailable quickly."""
        started = time.monotonic()
        async with AsyncClient("127.0.0.1:1", retry=FAST_GIVE_UP) as client:
            with pytest.raises(ServerUnavailable):
                await client.get_task_status(str(uuid.uuid4()))
        assert time.monotonic() - started < 5

    def test_a_circuit_open_error_says_why_the_servers_failed(self) -> None:
        """Once every breaker is open the client fails fast with CircuitOpen; its message
        used to say only that, with no cause. It names the last failure's status (here a
        refused connection), also for a later call that fails at once on the open breaker.

        One failure opens the breaker, for longer than the budget: each call ends with
        CircuitOpen (with more, backoff could outlast the budget first: ServerUnavailable).
        """
        opens_at_once = BreakerPolicy(failure_threshold=1, reset_timeout=timedelta(seconds=30))
        with Client("127.0.0.1:1", retry=FAST_GIVE_UP, breaker=opens_at_once) as client:
            for _ in range(2):
                with pytest.raises(CircuitOpen) as caught:
                    client.get_task_status(str(uuid.uuid4()))
                message = caught.value.message
                assert "every server (127.0.0.1:1) failed repeatedly" in message
                assert "last failure (127.0.0.1:1): UNAVAILABLE: " in message
                assert "Connection refused" in message


class TestServerOlderThanTheClient:
    async def test_a_missing_method_is_said_to_need_a_newer_server(
        self, server_without_the_methods: str
    ) -> None:
        """It used to read `UNIMPLEMENTED: Method not found!`, naming neither the call nor
        the likely cause. An enqueue goes as a call once the stream is refused: the error
        names EnqueueTasks, the operation asked for."""
        address = server_without_the_methods
        expected = (
            "UNIMPLEMENTED: the server has no {} call: it is probably older than this client "
            f"(conveyor {conveyor.__version__}); upgrade the server (it said: Method not found!)"
        )
        with Client(address) as client:
            with pytest.raises(ConveyorError) as caught:
                client.get_task_status(str(uuid.uuid4()))
            assert caught.value.message == expected.format("GetTask")
            with pytest.raises(ConveyorError) as caught:
                client.enqueue_task(Task(type="t"))
            assert caught.value.message == expected.format("EnqueueTasks")
        async with AsyncClient(address) as async_client:
            with pytest.raises(ConveyorError) as caught:
                await async_client.explain_task(str(uuid.uuid4()))
            assert caught.value.message == expected.format("ExplainTask")
            with pytest.raises(ConveyorError) as caught:
                await async_client.enqueue_task(Task(type="t"))
            assert caught.value.message == expected.format("EnqueueTasks")

    def test_a_worker_is_told_the_same(self, server_without_the_methods: str) -> None:
        worker = Worker(server_without_the_methods)
        worker.register_handler("t", lambda _ctx, payload: payload)
        with pytest.raises(ConveyorError) as caught:
            worker.start()
        worker.stop()
        assert caught.value.message.startswith(
            "UNIMPLEMENTED: the server has no RegisterWorker call: it is probably older than "
            "this client"
        )


class TestClientConstruction:
    def test_comma_separated_addresses(self) -> None:
        """Client accepts 'a:1,b:2' and keeps both addresses in rotation."""
        client = Client("a:1,b:2")
        try:
            assert sorted(client._ring.addresses) == ["a:1", "b:2"]
        finally:
            client.close()

    def test_address_list(self) -> None:
        """AsyncClient (and Client) accept a list of addresses."""
        client = AsyncClient(["a:1", "b:2"])
        assert sorted(client._ring.addresses) == ["a:1", "b:2"]

    def test_sync_context_manager_closes_channels(self, server) -> None:
        """`with Client(...)` yields a working client and closes its channels on exit."""
        with Client(server.address) as client:
            task_id = client.enqueue_task(Task(type="t"))
            assert client.get_task_status(task_id).state is TaskState.QUEUED
            assert client._channels
        assert client._channels == {}

    async def test_async_context_manager_closes_channels(self, server) -> None:
        """`async with AsyncClient(...)` yields a working client and closes its channels."""
        async with AsyncClient(server.address) as client:
            task_id = await client.enqueue_task(Task(type="t"))
            assert (await client.get_task_status(task_id)).state is TaskState.QUEUED
            assert client._channels
        assert client._channels == {}


class TestAsyncClientAcrossEventLoops:
    """grpc.aio channels belong to the loop they were opened on. An AsyncClient follows its
    loop: once that loop has closed (one `asyncio.run()` after another, a loop per test), it
    drops the old loop's connections and opens new ones; a loop that is still open keeps
    them, and another loop is refused with ConfigError."""

    def test_one_client_serves_one_asyncio_run_after_another(self, server) -> None:
        """Used to raise RuntimeError('Event loop is closed') in the second run, and in
        close()."""
        client = AsyncClient(server.address, retry=RetryPolicy(total_timeout=10))

        async def enqueue_and_read() -> TaskState:
            # An enqueue (on the client's enqueue stream) and a call: both kinds of
            # connection state the client keeps per loop.
            task_id = await client.enqueue_task(Task(type="t"))
            return (await client.get_task_status(task_id)).state

        assert asyncio.run(enqueue_and_read()) is TaskState.QUEUED
        first_channels = [weakref.ref(channel) for channel in client._channels.values()]
        assert first_channels
        assert asyncio.run(enqueue_and_read()) is TaskState.QUEUED
        # The first loop's channels were dropped, and grpc released them without an error
        # (pytest turns one raised while collecting them into a failure).
        gc.collect()
        assert [ref() for ref in first_channels] == [None] * len(first_channels)
        # Closed on yet another loop, the connections of the second one (now closed) are
        # dropped: close() must not raise because their loop is gone.
        asyncio.run(client.close())
        assert client._channels == {}
        assert asyncio.run(enqueue_and_read()) is TaskState.QUEUED
        asyncio.run(client.close())

    def test_a_loop_still_open_keeps_the_client_and_another_is_refused(self, server) -> None:
        """Two open loops cannot share the client's connections: ConfigError, not a hang or
        a RuntimeError from grpc; closing it on its own loop frees it for another."""
        client = AsyncClient(server.address, retry=RetryPolicy(total_timeout=10))
        first = asyncio.new_event_loop()
        try:
            task_id = first.run_until_complete(client.enqueue_task(Task(type="t")))
            with pytest.raises(ConfigError, match="belongs to another event loop"):
                asyncio.run(client.get_task_status(task_id))
            with pytest.raises(ConfigError, match="belongs to another event loop"):
                asyncio.run(client.close())
            # Still whole on its own loop.
            status = first.run_until_complete(client.get_task_status(task_id))
            assert status.state is TaskState.QUEUED
            first.run_until_complete(client.close())
        finally:
            first.close()
        assert asyncio.run(client.get_task_status(task_id)).state is TaskState.QUEUED
        asyncio.run(client.close())
