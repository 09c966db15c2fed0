"""Task history: every state change writes exactly one conveyor_task_events row, in the same
transaction as the change itself, except a task's first event, `enqueued`, which the history
view (conveyor_task_history) makes from the task row: the task row is written by the same
statement, and its `created_at` is the event's time.

The same-transaction evidence is PostgreSQL's now(): it is the start time of the current
transaction, so a history row written by the statement that changed the task carries
exactly the timestamp the task row got (created_at, started_at, finished_at, available_at).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.storage.queries import SQL

TYPE = "history.job"


class Driver:
    """Drives tasks through the raw gRPC API and records the state after each step."""

    def __init__(self, channel: grpc.Channel, db) -> None:
        self.tasks = pb_grpc.TaskServiceStub(channel)
        self.workers = pb_grpc.WorkerServiceStub(channel)
        self.db = db
        self.observed: list[str] = []
        self.task_id = ""

    def observe(self) -> None:
        self.observed.append(self.db.task(self.task_id)["state"])

    def enqueue(self, *, max_retries: int = 3) -> str:
        task_id = str(uuid.uuid4())
        spec = pb.TaskSpec(
            id=task_id,
            type=TYPE,
            payload=b"x",
            timeout=Duration(seconds=60),
            max_retries=max_retries,
        )
        self.tasks.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[spec]), timeout=10)
        self.task_id = task_id
        self.observe()
        return task_id

    def lease(self, worker_id: str = "w1") -> pb.Lease:
        self.workers.RegisterWorker(
            pb.RegisterWorkerRequest(
                worker_id=worker_id, host="h", pid=1, task_types=[TYPE], concurrency=1
            ),
            timeout=10,
        )
        # Long poll: a retried task becomes available after the (short) test backoff.
        request = pb.LeaseTasksRequest(
            worker_id=worker_id, task_types=[TYPE], max_tasks=1, wait=Duration(seconds=5)
        )
        leases = list(self.workers.LeaseTasks(request, timeout=15).leases)
        assert [lease.task_id for lease in leases] == [self.task_id]
        self.observe()
        return leases[0]

    def report(self, lease: pb.Lease, outcome: int, **fields: Any) -> None:
        self.workers.ReportResult(
            pb.ReportResultRequest(
                worker_id="w1",
                task_id=lease.task_id,
                lease_id=lease.lease_id,
                outcome=outcome,
                **fields,
            ),
            timeout=10,
        )
        self.observe()

    def cancel(self) -> None:
        self.tasks.CancelTask(pb.CancelTaskRequest(task_id=self.task_id), timeout=10)
        self.observe()

    def events(self) -> list[tuple[str, str]]:
        return [(row["event"], row["state"]) for row in self.db.events(self.task_id)]


# A retry's backoff long enough that the state a failure leaves (scheduled) is still there
# when the driver reads it: with the tests' usual 50 ms (at least 25 with its jitter) the
# promotion back to queued could come first on a loaded machine. The next lease's long poll
# waits out this backoff (0.5-1 s).
RETRY_BACKOFF = timedelta(seconds=1)


@pytest.fixture
def server(start_server: Callable[..., Any]) -> Any:
    return start_server(retry_backoff_base=RETRY_BACKOFF, retry_backoff_cap=RETRY_BACKOFF)


@pytest.fixture
def driver(server, db) -> Iterator[Driver]:
    channel = grpc.insecure_channel(server.address)
    try:
        yield Driver(channel, db)
    finally:
        channel.close()


def transitions(states: list[str]) -> int:
    """How many times consecutive states differ."""
    return sum(1 for before, after in itertools.pairwise(states) if before != after)


def run_retry_then_success(driver: Driver) -> None:
    driver.enqueue()
    first = driver.lease()
    driver.report(first, pb.OUTCOME_FAILED, error="boom")
    second = driver.lease()
    driver.report(second, pb.OUTCOME_SUCCEEDED, result=b"ok", has_result=True)


def run_cancel(driver: Driver) -> None:
    driver.enqueue()
    driver.cancel()


def run_release(driver: Driver) -> None:
    driver.enqueue()
    lease = driver.lease()
    driver.report(lease, pb.OUTCOME_RELEASED, error="stopping")


PATHS = {
    "retry-then-success": (
        run_retry_then_success,
        [
            ("enqueued", "queued"),
            ("started", "running"),
            # Stored as waiting out its backoff; read back publicly as QUEUED.
            ("failed", "scheduled"),
            ("started", "running"),
            ("succeeded", "succeeded"),
        ],
    ),
    "cancel": (run_cancel, [("enqueued", "queued"), ("cancelled", "cancelled")]),
    "release": (
        run_release,
        [("enqueued", "queued"), ("started", "running"), ("released", "queued")],
    ),
}


# queued>running>queued>running>succeeded; queued>cancelled; queued>running>queued.
STATE_CHANGES = {"retry-then-success": 4, "cancel": 1, "release": 2}


class TestEventSequence:
    @pytest.mark.parametrize("path", list(PATHS))
    def test_events_are_exactly_the_steps_taken(self, driver: Driver, path: str) -> None:
        """Each path leaves exactly its expected (event, state) rows, one per step, in order."""
        run, expected = PATHS[path]
        run(driver)
        assert driver.events() == expected
        # One event per step, and each event's state is the state the step left behind.
        assert [state for _, state in driver.events()] == driver.observed

    @pytest.mark.parametrize("path", list(PATHS))
    def test_state_changes_match_event_state_changes(self, driver: Driver, path: str) -> None:
        """The events' state sequence changes exactly as often as the task's state did."""
        PATHS[path][0](driver)
        event_states = [state for _, state in driver.events()]
        assert transitions(event_states) == transitions(driver.observed)
        assert transitions(driver.observed) == STATE_CHANGES[path]

    def test_attempt_and_worker_are_recorded(self, driver: Driver, db) -> None:
        """Events carry the attempt number and worker of the attempt they belong to."""
        run_retry_then_success(driver)
        rows = db.events(driver.task_id)
        assert [(row["attempt"], row["worker_id"]) for row in rows] == [
            (0, None),
            (1, "w1"),
            (1, "w1"),
            (2, "w1"),
            (2, "w1"),
        ]
        assert rows[2]["detail"] == "boom"


class TestSameTransaction:
    def test_event_times_equal_the_task_timestamps(self, driver: Driver, db) -> None:
        """enqueued/started/succeeded events carry exactly created_at/started_at/finished_at."""
        run_retry_then_success(driver)
        task = db.task(driver.task_id)
        events = db.events(driver.task_id)
        at = {row["event"]: row["at"] for row in events}  # the last of each kind wins
        assert at["enqueued"] == task["created_at"]
        assert at["started"] == task["started_at"]
        assert at["succeeded"] == task["finished_at"]
        # The first attempt started strictly earlier: `started_at` really is per attempt.
        first_started = next(row["at"] for row in events if row["event"] == "started")
        assert first_started < task["started_at"]

    def test_cancel_event_time_equals_finished_at(self, driver: Driver, db) -> None:
        """The 'cancelled' event carries exactly the task's finished_at."""
        run_cancel(driver)
        task = db.task(driver.task_id)
        [enqueued, cancelled] = db.events(driver.task_id)
        assert enqueued["at"] == task["created_at"]
        assert cancelled["at"] == task["finished_at"]

    def test_release_event_time_equals_available_at(self, driver: Driver, db) -> None:
        """The 'released' event carries exactly the available_at the release set."""
        run_release(driver)
        task = db.task(driver.task_id)
        released = db.events(driver.task_id)[-1]
        assert released["event"] == "released"
        assert released["at"] == task["available_at"]


class TestEnqueuedEvent:
    """A task's `enqueued` event is its own row, seen through the history view."""

    def test_an_enqueue_writes_no_history_row(self, driver: Driver, db) -> None:
        """The view makes the one `enqueued` event (id 0, at created_at); the table has none."""
        driver.enqueue()
        stored = db.fetchval(
            "SELECT count(*) FROM conveyor_task_events WHERE task_id = $1::uuid", driver.task_id
        )
        assert stored == 0
        [event] = db.events(driver.task_id)
        assert (event["id"], event["event"], event["state"], event["attempt"]) == (
            0,
            "enqueued",
            "queued",
            0,
        )
        assert event["at"] == db.task(driver.task_id)["created_at"]
        assert (event["worker_id"], event["detail"], event["actor"]) == (None, None, None)

    def test_a_task_enqueued_before_the_view_keeps_one_enqueued_event(
        self, driver: Driver, db
    ) -> None:
        """A task with a written `enqueued` row (from before migration 0009) shows only that one."""
        driver.enqueue()
        db.execute(
            "INSERT INTO conveyor_task_events (task_id, at, event, state, attempt)"
            " SELECT id, created_at, 'enqueued', 'queued', 0 FROM conveyor_tasks"
            " WHERE id = $1::uuid",
            driver.task_id,
        )
        lease = driver.lease()
        driver.report(lease, pb.OUTCOME_SUCCEEDED, result=b"ok", has_result=True)
        events = db.events(driver.task_id)
        assert [row["event"] for row in events] == ["enqueued", "started", "succeeded"]
        assert events[0]["id"] > 0  # the written row, not a made-up one
        answer = driver.tasks.GetTask(
            pb.GetTaskRequest(task_id=driver.task_id, include_history=True), timeout=10
        )
        assert [event.event for event in answer.task.history] == [
            "enqueued",
            "started",
            "succeeded",
        ]


class TestAtomicity:
    def test_rolled_back_success_leaves_no_change_and_no_event(
        self, driver: Driver, db, database_url
    ) -> None:
        """task_succeed inside a rolled-back transaction leaves neither the state nor the event."""
        driver.enqueue()
        lease = driver.lease()
        task_id, lease_id = uuid.UUID(lease.task_id), uuid.UUID(lease.lease_id)
        before = dict(db.task(lease.task_id))
        events_before = db.events(lease.task_id)

        async def succeed_then_roll_back() -> tuple[Any, Any, int]:
            conn = await asyncpg.connect(database_url)
            try:
                transaction = conn.transaction()
                await transaction.start()
                try:
                    row = await conn.fetchrow(SQL["task_succeed"], task_id, lease_id, b"r", "w1")
                    state_inside = await conn.fetchval(
                        "SELECT state FROM conveyor_tasks WHERE id = $1", task_id
                    )
                    events_inside = await conn.fetchval(
                        "SELECT count(*) FROM conveyor_task_events "
                        "WHERE task_id = $1 AND event = 'succeeded'",
                        task_id,
                    )
                finally:
                    await transaction.rollback()
                return row, state_inside, events_inside
            finally:
                await conn.close()

        row, state_inside, events_inside = asyncio.run(succeed_then_roll_back())
        # Inside the transaction the statement did both things...
        assert row is not None
        assert (row["state"], state_inside, events_inside) == ("succeeded", "succeeded", 1)
        # ...and after the rollback neither is there.
        assert dict(db.task(lease.task_id)) == before
        assert db.events(lease.task_id) == events_before
        assert [row["event"] for row in events_before] == ["enqueued", "started"]

    def test_refused_report_writes_no_event(self, driver: Driver, db) -> None:
        """A report with a stale lease changes nothing, so it writes no history row either."""
        driver.enqueue()
        lease = driver.lease()
        with pytest.raises(grpc.RpcError) as caught:
            driver.workers.ReportResult(
                pb.ReportResultRequest(
                    worker_id="w1",
                    task_id=lease.task_id,
                    lease_id=str(uuid.uuid4()),
                    outcome=pb.OUTCOME_SUCCEEDED,
                ),
                timeout=10,
            )
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert driver.events() == [("enqueued", "queued"), ("started", "running")]
