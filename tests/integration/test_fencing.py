"""Fencing at the wire: an outcome or heartbeat counts only for the task's current lease.

Everything here talks raw gRPC (WorkerService and TaskService stubs), the way a worker in
any language would, and checks the database row directly: a refused report must leave the
task exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
import re
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import enqueue_and_claim, metric_by_label, wait_for, writes_blocked
from prometheus_client.parser import text_string_to_metric_families

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.storage import queries
from conveyor.types import new_task_ids

TYPE = "fence.job"
STALE_METRIC = "conveyor_stale_completions_rejected_total"
STREAM_MESSAGES = "conveyor_work_stream_messages_total"


@dataclass
class Stubs:
    """Raw stubs for one server."""

    tasks: pb_grpc.TaskServiceStub
    workers: pb_grpc.WorkerServiceStub

    def enqueue(self, *, task_type: str = TYPE, count: int = 1, **fields: Any) -> list[str]:
        """Enqueue `count` tasks (60 s timeout, 3 retries unless overridden); return ids."""
        values: dict[str, Any] = {"timeout": Duration(seconds=60), "max_retries": 3}
        values.update(fields)
        specs = [
            pb.TaskSpec(id=str(uuid.uuid4()), type=task_type, payload=b"job", **values)
            for _ in range(count)
        ]
        response = self.tasks.EnqueueTasks(pb.EnqueueTasksRequest(tasks=specs), timeout=10)
        return list(response.task_ids)

    def register(self, worker_id: str, task_types: tuple[str, ...] = (TYPE,)) -> None:
        """Register a worker for `task_types`."""
        self.workers.RegisterWorker(
            pb.RegisterWorkerRequest(
                worker_id=worker_id,
                host="test-host",
                pid=1,
                task_types=list(task_types),
                concurrency=4,
                version="test",
            ),
            timeout=10,
        )

    def lease(
        self,
        worker_id: str,
        *,
        task_types: tuple[str, ...] = (TYPE,),
        max_tasks: int = 1,
        wait: float = 2.0,
    ) -> list[pb.Lease]:
        """LeaseTasks with a long-poll wait of `wait` seconds."""
        seconds = int(wait)
        request = pb.LeaseTasksRequest(
            worker_id=worker_id,
            task_types=list(task_types),
            max_tasks=max_tasks,
            wait=Duration(seconds=seconds, nanos=int((wait - seconds) * 1e9)),
        )
        return list(self.workers.LeaseTasks(request, timeout=wait + 10).leases)

    def lease_one(self, worker_id: str, **kwargs: Any) -> pb.Lease:
        """Register `worker_id` and lease exactly one task."""
        self.register(worker_id, kwargs.get("task_types", (TYPE,)))
        leases = self.lease(worker_id, **kwargs)
        assert len(leases) == 1, leases
        return leases[0]

    def report(
        self, worker_id: str, lease: pb.Lease | tuple[str, str], outcome: int, **fields: Any
    ) -> pb.ReportResultResponse:
        """ReportResult for a lease (or a (task_id, lease_id) pair)."""
        task_id, lease_id = (
            (lease.task_id, lease.lease_id) if isinstance(lease, pb.Lease) else lease
        )
        request = pb.ReportResultRequest(
            worker_id=worker_id, task_id=task_id, lease_id=lease_id, outcome=outcome, **fields
        )
        return self.workers.ReportResult(request, timeout=10)

    def heartbeat(self, worker_id: str, *leases: pb.Lease) -> pb.HeartbeatResponse:
        """Heartbeat naming `leases`."""
        refs = [pb.LeaseRef(task_id=lease.task_id, lease_id=lease.lease_id) for lease in leases]
        return self.workers.Heartbeat(
            pb.HeartbeatRequest(worker_id=worker_id, leases=refs), timeout=10
        )


@contextlib.contextmanager
def connect(address: str) -> Iterator[Stubs]:
    """Stubs on a channel that is closed afterwards."""
    channel = grpc.insecure_channel(address)
    try:
        yield Stubs(pb_grpc.TaskServiceStub(channel), pb_grpc.WorkerServiceStub(channel))
    finally:
        channel.close()


@pytest.fixture
def stubs(server) -> Iterator[Stubs]:
    """Raw stubs for the default test server."""
    with connect(server.address) as connected:
        yield connected


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """Run a call that must fail with an RpcError; return it."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def metric_value(http_url: str, name: str) -> float:
    """The value of an unlabelled metric on /metrics."""
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match[1])


def snapshot(db, task_id: str) -> dict[str, Any]:
    """Every column of the task row."""
    return dict(db.task(task_id))


def expire_lease(db, task_id: str) -> None:
    """Make the task's lease look expired one second ago."""
    db.execute(
        "UPDATE conveyor_tasks SET lease_expires_at = now() - interval '1 second' "
        "WHERE id = $1::uuid",
        task_id,
    )


class TestReportWithUnknownLease:
    def test_made_up_lease_is_refused_and_task_untouched(self, stubs: Stubs, db) -> None:
        """ReportResult with a made-up lease id is FAILED_PRECONDITION; the row is unchanged."""
        stubs.enqueue()
        lease = stubs.lease_one("w1")
        before = snapshot(db, lease.task_id)
        for outcome in (pb.OUTCOME_SUCCEEDED, pb.OUTCOME_FAILED, pb.OUTCOME_RELEASED):
            error = rpc_error(
                stubs.report,
                "w1",
                (lease.task_id, str(uuid.uuid4())),
                outcome,
                result=b"forged",
                has_result=True,
                error="forged",
            )
            assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, error.details()
        after = snapshot(db, lease.task_id)
        assert after == before
        assert after["state"] == "running"
        assert str(after["lease_id"]) == lease.lease_id
        assert after["attempt"] == 1
        assert [event["event"] for event in db.events(lease.task_id)] == ["enqueued", "started"]


class TestExpiredLeaseIsFenced:
    def test_old_worker_cannot_complete_a_reclaimed_task(
        self, server, stubs: Stubs, db, caplog: pytest.LogCaptureFixture
    ) -> None:
        """After the reaper requeues an expired lease, only the new lease's report counts."""
        [task_id] = stubs.enqueue()
        first = stubs.lease_one("worker-old")
        assert (first.task_id, first.attempt) == (task_id, 1)

        expire_lease(db, task_id)

        def requeued() -> bool:
            row = db.task(task_id)
            events = [event["event"] for event in db.events(task_id)]
            return (
                row["state"] == "queued" and row["lease_id"] is None and ("lease_expired" in events)
            )

        wait_for(requeued, timeout=10, what="the reaper to requeue the expired lease")
        expired_event = db.events(task_id)[-1]
        # The retry waited out its backoff as `scheduled` (publicly QUEUED), then queued.
        assert (expired_event["event"], expired_event["state"]) == ("lease_expired", "scheduled")
        assert expired_event["worker_id"] == "worker-old"

        second = stubs.lease_one("worker-new")
        assert second.task_id == task_id
        assert second.attempt == 2
        assert second.lease_id != first.lease_id

        beat = stubs.heartbeat("worker-old", first)
        assert [(s.task_id, s.reason) for s in beat.stop] == [(task_id, pb.STOP_REASON_LEASE_LOST)]

        caplog.set_level(logging.INFO, logger="conveyor.server")
        stale_before = metric_value(server.http_url, STALE_METRIC)
        error = rpc_error(
            stubs.report, "worker-old", first, pb.OUTCOME_SUCCEEDED, result=b"old", has_result=True
        )
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert error.details().startswith("lease lost: ")
        stale_after = metric_value(server.http_url, STALE_METRIC)
        assert stale_after >= 1
        assert stale_after == stale_before + 1
        # The log names the task's attempt as the current one: logged as `attempt`, it
        # read as the stale report's (attempt 2 for attempt 1's report).
        [refusal] = [
            r for r in caplog.records if getattr(r, "event", "") == "stale_report_rejected"
        ]
        assert (refusal.current_attempt, hasattr(refusal, "attempt")) == (2, False)
        assert "is running, attempt 2" in refusal.getMessage()
        row = db.task(task_id)
        assert (row["state"], str(row["lease_id"]), row["result"]) == (
            "running",
            second.lease_id,
            None,
        )

        response = stubs.report(
            "worker-new", second, pb.OUTCOME_SUCCEEDED, result=b"new", has_result=True
        )
        assert response.state == pb.TASK_STATE_SUCCEEDED
        row = db.task(task_id)
        assert row["state"] == "succeeded"
        assert bytes(row["result"]) == b"new"
        assert row["worker_id"] == "worker-new"
        assert row["attempt"] == 2


class TestCancelRevokesLease:
    def test_cancelled_running_task_is_fenced(self, stubs: Stubs, db) -> None:
        """CancelTask on a running task cancels it at once, stops its lease, refuses its report."""
        [task_id] = stubs.enqueue()
        lease = stubs.lease_one("w1")

        cancelled = stubs.tasks.CancelTask(pb.CancelTaskRequest(task_id=task_id), timeout=10)
        assert cancelled.task.state == pb.TASK_STATE_CANCELLED
        row = db.task(task_id)
        assert (row["state"], row["lease_id"]) == ("cancelled", None)

        beat = stubs.heartbeat("w1", lease)
        assert [(s.task_id, s.lease_id, s.reason) for s in beat.stop] == [
            (task_id, lease.lease_id, pb.STOP_REASON_CANCELLED)
        ]

        error = rpc_error(
            stubs.report, "w1", lease, pb.OUTCOME_SUCCEEDED, result=b"late", has_result=True
        )
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        row = db.task(task_id)
        assert row["state"] == "cancelled"
        assert row["result"] is None
        assert [event["event"] for event in db.events(task_id)] == [
            "enqueued",
            "started",
            "cancelled",
        ]


class TestHeartbeat:
    def test_heartbeat_extends_a_current_lease(self, stubs: Stubs, db) -> None:
        """A heartbeat for a current lease moves lease_expires_at forward and stops nothing."""
        [task_id] = stubs.enqueue()
        lease = stubs.lease_one("w1")
        db.execute(
            "UPDATE conveyor_tasks SET lease_expires_at = now() + interval '5 seconds' "
            "WHERE id = $1::uuid",
            task_id,
        )
        before = db.task(task_id)["lease_expires_at"]

        beat = stubs.heartbeat("w1", lease)

        assert list(beat.stop) == []
        after = db.task(task_id)
        # The test server's lease_ttl is 30 s: the lease now ends ~30 s from now.
        assert after["lease_expires_at"] > before + timedelta(seconds=20)
        assert (after["state"], str(after["lease_id"])) == ("running", lease.lease_id)

    def test_heartbeat_for_an_expired_lease_says_lease_lost(self, start_server, db) -> None:
        """A heartbeat naming a lease that already expired gets STOP_REASON_LEASE_LOST."""
        server = start_server(reaper_interval=timedelta(hours=1))
        with connect(server.address) as stubs:
            [task_id] = stubs.enqueue()
            lease = stubs.lease_one("w1")
            expire_lease(db, task_id)
            expired_at = db.task(task_id)["lease_expires_at"]

            beat = stubs.heartbeat("w1", lease)

        assert [(s.task_id, s.lease_id, s.reason) for s in beat.stop] == [
            (task_id, lease.lease_id, pb.STOP_REASON_LEASE_LOST)
        ]
        # A lost lease is not revived by the heartbeat.
        assert db.task(task_id)["lease_expires_at"] == expired_at

    def test_an_old_lease_is_lost_beside_the_same_tasks_new_one(self, start_server, db) -> None:
        """A worker names a task's old lease (reaped while the attempt ran on) and the new
        lease the same task got from it again. The new one is extended; the old one must be
        told to stop. Matched by task id, the statement said nothing of the old lease."""
        server = start_server(reaper_interval=timedelta(hours=1))
        with connect(server.address) as stubs:
            [task_id] = stubs.enqueue()
            old = stubs.lease_one("w1")
            db.execute(
                "UPDATE conveyor_tasks SET state = 'queued', lease_id = NULL, "
                "lease_expires_at = NULL, deadline_at = NULL WHERE id = $1::uuid",
                task_id,
            )  # as the reaper requeues it
            new = stubs.lease("w1")[0]
            assert (new.task_id, new.attempt) == (task_id, 2)
            extended_before = db.task(task_id)["lease_expires_at"]

            beat = stubs.heartbeat("w1", old, new)

        assert [(s.task_id, s.lease_id, s.reason) for s in beat.stop] == [
            (task_id, old.lease_id, pb.STOP_REASON_LEASE_LOST)
        ]
        row = db.task(task_id)
        assert str(row["lease_id"]) == new.lease_id
        assert row["lease_expires_at"] > extended_before

    def test_heartbeat_sorts_current_and_lost_leases(self, stubs: Stubs, db) -> None:
        """Of two named leases, only the one that is no longer current is returned in `stop`."""
        stubs.enqueue(count=2)
        stubs.register("w1")
        first, second = stubs.lease("w1", max_tasks=2)
        stubs.tasks.CancelTask(pb.CancelTaskRequest(task_id=second.task_id), timeout=10)

        beat = stubs.heartbeat("w1", first, second)

        assert [(s.task_id, s.reason) for s in beat.stop] == [
            (second.task_id, pb.STOP_REASON_CANCELLED)
        ]


class TestRelease:
    def test_released_task_is_queued_again_without_spending_the_attempt(
        self, stubs: Stubs, db
    ) -> None:
        """OUTCOME_RELEASED puts the task back in the queue with its attempt not counted."""
        [task_id] = stubs.enqueue()
        lease = stubs.lease_one("w1")
        assert db.task(task_id)["attempt"] == 1

        response = stubs.report("w1", lease, pb.OUTCOME_RELEASED, error="shutting down")

        assert response.state == pb.TASK_STATE_QUEUED
        row = db.task(task_id)
        # No lease held (no expiry); the lease id stays to say which lease settled it.
        assert (row["state"], row["attempt"], row["lease_expires_at"]) == ("queued", 0, None)
        assert str(row["lease_id"]) == lease.lease_id
        last = db.events(task_id)[-1]
        assert (last["event"], last["state"], last["attempt"]) == ("released", "queued", 1)

        again = stubs.lease_one("w2", wait=0)
        assert (again.task_id, again.attempt) == (task_id, 1)
        assert again.lease_id != lease.lease_id


class TestNoDoubleLease:
    def test_a_leased_task_is_not_leased_again(self, stubs: Stubs, db) -> None:
        """While a task is leased, another LeaseTasks (any worker) does not return it."""
        [task_id] = stubs.enqueue()
        lease = stubs.lease_one("w1")
        assert lease.task_id == task_id
        assert stubs.lease("w1", wait=0) == []
        stubs.register("w2")
        assert stubs.lease("w2", max_tasks=10, wait=0) == []
        assert str(db.task(task_id)["lease_id"]) == lease.lease_id

    def test_each_task_goes_to_one_lease(self, stubs: Stubs) -> None:
        """Leasing in small batches hands out every task exactly once."""
        ids = stubs.enqueue(count=5)
        stubs.register("w1")
        leased = [lease.task_id for _ in range(3) for lease in stubs.lease("w1", max_tasks=2)]
        assert sorted(leased) == sorted(ids)


class TestConcurrentLeasing:
    def test_parallel_lease_calls_hand_out_each_task_once(self, server, stubs: Stubs, db) -> None:
        """Eight workers leasing at once get disjoint tasks that together cover the backlog."""
        ids = stubs.enqueue(count=40)

        def drain(worker_id: str) -> list[str]:
            with connect(server.address) as own:
                own.register(worker_id)
                taken: list[str] = []
                while leases := own.lease(worker_id, max_tasks=3, wait=0):
                    taken.extend(lease.task_id for lease in leases)
                return taken

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(drain, [f"w{i}" for i in range(8)]))
        leased = [task_id for taken in results for task_id in taken]
        assert sorted(leased) == sorted(ids)
        assert (
            db.fetchval("SELECT count(*) FROM conveyor_task_events WHERE event = 'started'") == 40
        )
        assert db.fetchval("SELECT max(attempt) FROM conveyor_tasks") == 1


class TestLeaseByType:
    def test_only_requested_types_are_leased(self, stubs: Stubs, db) -> None:
        """LeaseTasks for type 'a' returns only 'a' tasks; 'b' tasks stay queued."""
        a_ids = stubs.enqueue(task_type="a", count=3)
        b_ids = stubs.enqueue(task_type="b", count=3)
        stubs.register("w1", ("a",))

        leases = stubs.lease("w1", task_types=("a",), max_tasks=10, wait=0)

        assert sorted(lease.task_id for lease in leases) == sorted(a_ids)
        assert {lease.type for lease in leases} == {"a"}
        assert {db.task(task_id)["state"] for task_id in b_ids} == {"queued"}
        assert stubs.lease("w1", task_types=("a", "c"), max_tasks=10, wait=0) == []


class TestReportValidation:
    def test_unknown_task_is_not_found(self, stubs: Stubs) -> None:
        """ReportResult for a task id that does not exist is NOT_FOUND."""
        error = rpc_error(
            stubs.report, "w1", (str(uuid.uuid4()), str(uuid.uuid4())), pb.OUTCOME_SUCCEEDED
        )
        assert error.code() is grpc.StatusCode.NOT_FOUND

    @pytest.mark.parametrize(
        ("task_id", "lease_id"),
        [("not-a-uuid", str(uuid.uuid4())), (str(uuid.uuid4()), "not-a-uuid"), ("", "")],
        ids=["bad-task-id", "bad-lease-id", "empty-ids"],
    )
    def test_malformed_ids_are_invalid_argument(self, stubs: Stubs, task_id, lease_id) -> None:
        """ReportResult with a malformed task or lease id is INVALID_ARGUMENT."""
        error = rpc_error(stubs.report, "w1", (task_id, lease_id), pb.OUTCOME_SUCCEEDED)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error.details()

    def test_unspecified_outcome_is_invalid_argument(self, stubs: Stubs, db) -> None:
        """ReportResult with OUTCOME_UNSPECIFIED is INVALID_ARGUMENT and changes nothing."""
        stubs.enqueue()
        lease = stubs.lease_one("w1")
        before = snapshot(db, lease.task_id)
        error = rpc_error(stubs.report, "w1", lease, pb.OUTCOME_UNSPECIFIED)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert snapshot(db, lease.task_id) == before


class TestLeaseValidation:
    def test_zero_max_tasks_is_invalid_argument(self, stubs: Stubs) -> None:
        """LeaseTasks with max_tasks=0 is INVALID_ARGUMENT."""
        stubs.register("w1")
        error = rpc_error(stubs.lease, "w1", max_tasks=0, wait=0)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT

    def test_no_task_types_is_invalid_argument(self, stubs: Stubs) -> None:
        """LeaseTasks naming no task type is INVALID_ARGUMENT."""
        stubs.register("w1")
        error = rpc_error(stubs.lease, "w1", task_types=(), wait=0)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT

    def test_invalid_task_type_is_invalid_argument(self, stubs: Stubs) -> None:
        """LeaseTasks naming a malformed task type is INVALID_ARGUMENT."""
        error = rpc_error(stubs.lease, "w1", task_types=("bad type!",), wait=0)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT

    def test_out_of_range_wait_is_not_an_internal_error(self, stubs: Stubs) -> None:
        """A wait beyond any sane range is clamped (or refused as INVALID_ARGUMENT), not a crash."""
        [task_id] = stubs.enqueue()
        stubs.register("w1")
        request = pb.LeaseTasksRequest(
            worker_id="w1", task_types=[TYPE], max_tasks=1, wait=Duration(seconds=2**62)
        )
        outcome: tuple[str, Any]
        try:
            response = stubs.workers.LeaseTasks(request, timeout=10)
            outcome = ("leased", tuple(lease.task_id for lease in response.leases))
        except grpc.RpcError as error:
            outcome = ("refused", error.code())
        assert outcome in {
            ("leased", (task_id,)),
            ("refused", grpc.StatusCode.INVALID_ARGUMENT),
        }, outcome

    def test_empty_worker_id_is_invalid_argument(self, stubs: Stubs) -> None:
        """LeaseTasks without a worker id is INVALID_ARGUMENT."""
        error = rpc_error(stubs.lease, "", wait=0)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


class TestSuccessReportsInOneStatement:
    """Concurrent success reports share a statement (group commit) and keep fencing exact."""

    def test_racing_duplicate_reports_of_one_lease_apply_once(self, server, stubs: Stubs, db):
        """Eight identical success reports at once: one applies, and the seven others, which
        repeat the very outcome that settled the task, are answered as applied without
        applying anything again (they used to be refused as stale). The history has one
        `succeeded`, and no stale completion is counted."""
        stubs.enqueue()
        lease = stubs.lease_one("w-dup")

        def report(_index: int) -> grpc.StatusCode:
            try:
                stubs.report("w-dup", lease, pb.OUTCOME_SUCCEEDED, result=b"r", has_result=True)
            except grpc.RpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        with ThreadPoolExecutor(max_workers=8) as pool:
            codes = list(pool.map(report, range(8)))
        assert codes == [grpc.StatusCode.OK] * 8
        assert metric_value(server.http_url, STALE_METRIC) == 0
        row = snapshot(db, lease.task_id)
        assert row["state"] == "succeeded"
        assert bytes(row["result"]) == b"r"
        assert (
            db.fetchval(
                "SELECT count(*) FROM conveyor_task_events "
                "WHERE task_id = $1::uuid AND event = 'succeeded'",
                lease.task_id,
            )
            == 1
        )

    async def test_a_stale_report_first_in_a_statement_does_not_hide_the_current_one(
        self, database_url: str
    ) -> None:
        """The group commit may put a late report of an old lease (its worker was presumed
        lost, the task claimed again) before the current holder's report of the same task:
        the current one applies, the stale one is refused, and duplicates of the current one
        apply once. Before, only the first report of each task was considered, so the
        holder was told its lease was lost and the task would have run again."""
        conn = await asyncpg.connect(database_url)
        try:
            ids = new_task_ids(2)
            old = await enqueue_and_claim(conn, "fence.stale", ids, "w-old")
            # The first task is claimed again by another worker (as after the sweep and the
            # reaper): a new lease, a second attempt.
            new_lease = str(uuid.uuid4())
            await conn.execute(
                "UPDATE conveyor_tasks SET lease_id = $2::uuid, worker_id = 'w-new', "
                "attempt = 2 WHERE id = $1::uuid",
                ids[0],
                new_lease,
            )
            reports = [
                queries.Success(ids[0], old[ids[0]], "w-old", b"stale"),
                queries.Success(ids[1], old[ids[1]], "w-old", b"second task"),
                queries.Success(ids[0], new_lease, "w-new", b"current"),
                queries.Success(ids[0], new_lease, "w-new", b"current again"),
            ]
            rows = await queries.task_succeed_many(conn, reports)
            assert [str(row["task_id"]) for row in rows] == [ids[0], ids[1], ids[0], ids[0]]
            assert [row["applied"] for row in rows] == [False, True, True, False]
            stored = {
                str(row["id"]): (row["state"], bytes(row["result"]), row["worker_id"])
                for row in await conn.fetch(
                    "SELECT id, state::text, result, worker_id FROM conveyor_tasks "
                    "WHERE id = ANY($1::uuid[])",
                    ids,
                )
            }
            assert stored == {
                ids[0]: ("succeeded", b"current", "w-new"),
                ids[1]: ("succeeded", b"second task", "w-old"),
            }
            succeeded_events = await conn.fetchval(
                "SELECT count(*) FROM conveyor_task_events "
                "WHERE task_id = ANY($1::uuid[]) AND event = 'succeeded'",
                ids,
            )
            assert succeeded_events == 2
        finally:
            await conn.close()

    def test_many_workers_reporting_at_once_share_statements(
        self, server, stubs: Stubs, db, database_url: str
    ):
        """48 successes reported concurrently: all applied, in fewer statements than reports,
        each with its own result.

        The task table is locked while they arrive, so the group commit's two statements in
        flight wait and the reports behind them queue up to share the next one, as under
        load; unlocked, a fast machine answered each report before the next arrived (48
        statements for 48 reports, seen once)."""
        ids = stubs.enqueue(count=48)
        stubs.register("w-many")
        leases = stubs.lease("w-many", max_tasks=48)
        assert sorted(lease.task_id for lease in leases) == sorted(ids)
        before = metric_value(server.http_url, "conveyor_report_group_calls_count")

        def report(lease: pb.Lease) -> None:
            stubs.report(
                "w-many",
                lease,
                pb.OUTCOME_SUCCEEDED,
                result=lease.task_id.encode(),
                has_result=True,
            )

        with ThreadPoolExecutor(max_workers=48) as pool:
            with writes_blocked(database_url):
                reported = [pool.submit(report, lease) for lease in leases]
                wait_for(
                    lambda: (
                        db.fetchval(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                        )
                        >= 2
                    ),
                    what="both of the group commit's statements to wait on the lock",
                )
            for done in reported:
                done.result()
        statements = metric_value(server.http_url, "conveyor_report_group_calls_count") - before
        assert 0 < statements < 48
        rows = db.fetch(
            "SELECT id::text, state::text, result FROM conveyor_tasks WHERE id = ANY($1::uuid[])",
            ids,
        )
        assert {row["state"] for row in rows} == {"succeeded"}
        assert all(bytes(row["result"]) == row["id"].encode() for row in rows)


class TestReportResultsBatch:
    def test_each_report_in_a_batch_gets_its_own_answer(self, server, stubs: Stubs, db):
        """Mixed outcomes in one call: applied or refused one by one, answers in order."""
        stubs.enqueue(count=3)
        stubs.register("w-batch")
        first, second, third = stubs.lease("w-batch", max_tasks=3)
        stale = pb.ReportResultRequest(
            worker_id="w-batch",
            task_id=third.task_id,
            lease_id=str(uuid.uuid4()),
            outcome=pb.OUTCOME_SUCCEEDED,
        )
        request = pb.ReportResultsRequest(
            worker_id="w-batch",
            reports=[
                pb.ReportResultRequest(
                    worker_id="w-batch",
                    task_id=first.task_id,
                    lease_id=first.lease_id,
                    outcome=pb.OUTCOME_SUCCEEDED,
                ),
                pb.ReportResultRequest(
                    worker_id="w-batch",
                    task_id=second.task_id,
                    lease_id=second.lease_id,
                    outcome=pb.OUTCOME_FAILED,
                    error="ValueError: boom",
                ),
                stale,
                pb.ReportResultRequest(
                    worker_id="someone-else",
                    task_id=third.task_id,
                    lease_id=third.lease_id,
                    outcome=pb.OUTCOME_SUCCEEDED,
                ),
            ],
        )
        outcomes = stubs.workers.ReportResults(request, timeout=10).outcomes
        assert [grpc.StatusCode.OK.value[0] if o.code == 0 else o.code for o in outcomes] == [
            grpc.StatusCode.OK.value[0],
            grpc.StatusCode.OK.value[0],
            grpc.StatusCode.FAILED_PRECONDITION.value[0],
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
        ]
        assert outcomes[0].state == pb.TASK_STATE_SUCCEEDED
        assert outcomes[1].state == pb.TASK_STATE_QUEUED  # a retry is scheduled
        assert "no longer current" in outcomes[2].message
        assert snapshot(db, first.task_id)["state"] == "succeeded"
        retried = snapshot(db, second.task_id)
        # Stored `scheduled` while the retry waits out its backoff (publicly QUEUED), and
        # `queued` once promoted: the test server's backoff is short enough to pass first.
        assert retried["state"] in {"scheduled", "queued"}
        assert (retried["attempt"], retried["last_error"]) == (1, "ValueError: boom")
        assert snapshot(db, third.task_id)["state"] == "running"  # neither report applied

    @pytest.mark.parametrize("work_stream", [True, False], ids=["stream", "calls"])
    def test_a_busy_worker_reports_in_batches(self, start_server, work_stream):
        """A real worker finishing many tasks at once sends its reports in batches (on its
        Work stream, or in ReportResults calls on a server without one), and every task
        ends succeeded exactly once."""
        from conveyor import Client, Task, TaskState, Worker  # noqa: PLC0415

        server = start_server(work_stream=work_stream)
        worker = Worker(server.address, concurrency=32)
        worker.register_handler("batch.noop", lambda _ctx, payload: payload)
        worker.start()
        try:
            with Client(server.address) as client:
                ids = client.enqueue_tasks([Task(type="batch.noop") for _ in range(400)])
                wait_for(
                    lambda: all(
                        client.get_task_status(task_id).state is TaskState.SUCCEEDED
                        for task_id in ids
                    ),
                    timeout=60,
                    what="every task to succeed",
                )
        finally:
            worker.stop()
        if work_stream:
            # The server counts an answer once its write completes, which may be just after
            # the worker has it.
            def answered() -> bool:
                counted = metric_by_label(server.http_url, STREAM_MESSAGES, "kind")
                return counted.get("answer") == counted.get("reports")

            wait_for(answered, what="every batch's answer to be counted")
        with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as response:  # noqa: S310
            body = response.read().decode()
        samples = [
            sample for family in text_string_to_metric_families(body) for sample in family.samples
        ]
        calls = {
            sample.labels["method"]: sample.value
            for sample in samples
            # Requests, and long polls (LeaseTasks) from the histogram of long calls.
            if sample.name
            in ("conveyor_rpc_duration_seconds_count", "conveyor_long_rpc_duration_seconds_count")
            and sample.labels["code"] == "OK"
        }
        batches = {
            sample.labels["kind"]: sample.value
            for sample in samples
            if sample.name == "conveyor_work_stream_messages_total"
        }
        # 400 reports in far fewer batches, and each path used only when it should be.
        if work_stream:
            assert 1 <= batches.get("reports", 0) < 400, batches
            assert batches["answer"] == batches["reports"], batches
            assert calls.get("ReportResults", 0) + calls.get("ReportResult", 0) == 0, calls
            assert calls.get("LeaseTasks", 0) == 0, calls
        else:
            assert 1 <= calls.get("ReportResults", 0) < 400, calls
            assert calls.get("ReportResult", 0) == 0, calls
            assert batches.get("reports", 0) == 0, batches


class TestALeaseIdAloneIsNoLease:
    @pytest.mark.parametrize("report", ["succeed", "succeed_many", "fail", "release"])
    async def test_a_task_that_is_not_running_is_never_settled_by_a_report(
        self, database_url: str, report: str
    ) -> None:
        """Reports name the lease and its expiry, not the state: the table's CHECK ties
        `state = 'running'` to both, but a lease id alone on a task in another state would
        pass it. Such a task (cancelled here) is left alone by every report naming it."""
        task_id, lease_id = str(uuid.uuid4()), str(uuid.uuid4())
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "INSERT INTO conveyor_tasks (id, type, state, attempt, max_retries, timeout, "
                "started_at, finished_at, worker_id, lease_id, payload) "
                "VALUES ($1::uuid, 'fence.odd', 'cancelled', 1, 3, interval '60 seconds', "
                "now(), now(), 'w-odd', $2::uuid, '')",
                task_id,
                lease_id,
            )
            if report == "succeed":
                row = await queries.task_succeed(
                    conn, task_id=task_id, lease_id=lease_id, worker_id="w-odd", result=None
                )
                assert row is None
            elif report == "succeed_many":
                rows = await queries.task_succeed_many(
                    conn, [queries.Success(task_id, lease_id, "w-odd", None)]
                )
                assert [row["applied"] for row in rows] == [False]
            elif report == "fail":
                row = await queries.task_fail(
                    conn,
                    task_id=task_id,
                    lease_id=lease_id,
                    worker_id="w-odd",
                    error="ValueError: boom",
                    event="failed",
                    retryable=True,
                    backoff=queries.Backoff(base=timedelta(seconds=1), cap=timedelta(seconds=5)),
                )
                assert row is None
            else:
                row = await queries.task_release(
                    conn,
                    task_id=task_id,
                    lease_id=lease_id,
                    worker_id="w-odd",
                    reason="back",
                    delivered=True,
                    max_releases=1000,
                )
                assert row is None
            state = await conn.fetchval(
                "SELECT state::text FROM conveyor_tasks WHERE id = $1::uuid", task_id
            )
            events = await conn.fetchval(
                "SELECT count(*) FROM conveyor_task_events WHERE task_id = $1::uuid", task_id
            )
        finally:
            await conn.close()
        assert state == "cancelled"
        assert events == 0
