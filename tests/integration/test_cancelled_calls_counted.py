"""A call cancelled while its write waits still has the write counted, exactly once.

The write (an insert, an outcome, a cancel, a batch of an operator's bulk cancel) may
commit after the call that asked for it was cancelled (its deadline passed while the
database was slow), and the client's retry is then an idempotent repeat, which is not
counted. Each test blocks writes with a SHARE lock on the task table, lets the call's
deadline pass while its statement waits, releases the lock,
retries as a client would, and reads the server's counters.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import (
    Db,
    enqueue_and_claim,
    metric_samples,
    rpc_count,
    wait_for,
    worker_stub,
    writes_blocked,
)

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

# Long enough for the statement to reach the lock; the test waits for that, not for time.
DEADLINE = 2.0


def metric_sum(http_url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(
        sample.value
        for sample in metric_samples(http_url)
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def cut_off_while_blocked(
    db: Db,
    database_url: str,
    server: Any,
    method: str,
    call: Callable[[float], Any],
    *,
    server_cancels_first: bool,
) -> None:
    """Make `call(timeout)` wait behind a table lock until its deadline passes, then release.

    `server_cancels_first`: also wait, before releasing, until the server has ended the
    call as cancelled (the write then commits with nobody left to count it in the caller).
    """
    cancelled_before = rpc_count(server.http_url, method, "CANCELLED")
    with writes_blocked(database_url) as blocker:
        pending = call(DEADLINE)
        wait_for(
            lambda: db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                blocker,
            ),
            what="the call's statement waiting for the lock",
        )
        with pytest.raises(grpc.RpcError) as raised:
            pending.result()
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        if server_cancels_first:
            wait_for(
                lambda: rpc_count(server.http_url, method, "CANCELLED") > cancelled_before,
                what="the server to end the call as cancelled",
            )


def claimed(database_url: str, task_type: str, worker_id: str) -> tuple[str, str]:
    """A task of `task_type` leased to `worker_id`: (task id, lease id)."""

    async def go() -> dict[str, str]:
        conn = await asyncpg.connect(database_url)
        try:
            return await enqueue_and_claim(conn, task_type, [str(uuid.uuid4())], worker_id)
        finally:
            await conn.close()

    ((task_id, lease_id),) = asyncio.run(go()).items()
    return task_id, lease_id


def register(stub: Any, task_type: str) -> None:
    """Register the tests' worker, for `task_type`, so that its reports are its own."""
    stub.RegisterWorker(
        pb.RegisterWorkerRequest(worker_id="cut-off-worker", task_types=[task_type], concurrency=1),
        timeout=10,
    )


def test_an_enqueue_cut_off_by_its_deadline_is_counted_once(
    server: Any, db: Db, database_url: str
) -> None:
    task_id = str(uuid.uuid4())
    request = pb.EnqueueTasksRequest(
        tasks=[pb.TaskSpec(id=task_id, type="cut-off-enqueue", timeout=Duration(seconds=60))]
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TaskServiceStub(channel)
        cut_off_while_blocked(
            db,
            database_url,
            server,
            "EnqueueTasks",
            lambda timeout: stub.EnqueueTasks.future(request, timeout=timeout),
            server_cancels_first=True,
        )
        # The shared insert goes on once the lock is gone, with nobody waiting for it.
        wait_for(
            lambda: db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE id = $1", task_id),
            what="the cut-off insert to commit",
        )
        retry = stub.EnqueueTasks(request, timeout=10)
    assert list(retry.created) == [False]  # a repeat, rightly not counted again
    enqueued = wait_for(
        lambda: metric_sum(
            server.http_url, "conveyor_tasks_enqueued_total", type="cut-off-enqueue"
        ),
        what="the task to be counted",
    )
    assert enqueued == 1


def test_a_success_report_cut_off_by_its_deadline_is_counted_once(
    server: Any, db: Db, database_url: str
) -> None:
    task_id, lease_id = claimed(database_url, "cut-off-success", "cut-off-worker")
    report = pb.ReportResultRequest(
        worker_id="cut-off-worker",
        task_id=task_id,
        lease_id=lease_id,
        outcome=pb.OUTCOME_SUCCEEDED,
        result=b"done",
    )
    with worker_stub(server.address) as stub:
        register(stub, "cut-off-success")
        cut_off_while_blocked(
            db,
            database_url,
            server,
            "ReportResult",
            lambda timeout: stub.ReportResult.future(report, timeout=timeout),
            server_cancels_first=True,
        )
        wait_for(
            lambda: db.task(task_id)["state"] == "succeeded",
            what="the cut-off success to commit",
        )
        retry = stub.ReportResult(report, timeout=10)
    assert retry.state == pb.TASK_STATE_SUCCEEDED  # answered as applied, not counted again
    labels = {"type": "cut-off-success", "outcome": "succeeded"}
    succeeded = wait_for(
        lambda: metric_sum(server.http_url, "conveyor_task_outcomes_total", **labels),
        what="the success to be counted",
    )
    assert succeeded == 1
    assert metric_sum(server.http_url, "conveyor_task_duration_seconds_count", **labels) == 1
    assert metric_sum(server.http_url, "conveyor_stale_completions_rejected_total") == 0


def test_a_failure_report_cut_off_by_its_deadline_is_counted_once(
    server: Any, db: Db, database_url: str
) -> None:
    task_id, lease_id = claimed(database_url, "cut-off-failure", "cut-off-worker")
    report = pb.ReportResultRequest(
        worker_id="cut-off-worker",
        task_id=task_id,
        lease_id=lease_id,
        outcome=pb.OUTCOME_FAILED,
        error="broken",
        non_retryable=True,
    )
    with worker_stub(server.address) as stub:
        register(stub, "cut-off-failure")
        # Not waiting for the server's cancellation: the outcome's statement now outlives
        # the call, which ends only once it has committed.
        cut_off_while_blocked(
            db,
            database_url,
            server,
            "ReportResult",
            lambda timeout: stub.ReportResult.future(report, timeout=timeout),
            server_cancels_first=False,
        )
        retry = stub.ReportResult(report, timeout=10)
    assert retry.state == pb.TASK_STATE_FAILED
    assert db.task(task_id)["state"] == "failed"
    labels = {"type": "cut-off-failure", "outcome": "failed"}
    failed = wait_for(
        lambda: metric_sum(server.http_url, "conveyor_task_outcomes_total", **labels),
        what="the failure to be counted",
    )
    assert failed == 1
    assert metric_sum(server.http_url, "conveyor_task_duration_seconds_count", **labels) == 1


def queued(server: Any, task_type: str, count: int = 1) -> list[str]:
    """Enqueue `count` tasks of `task_type`, with no worker for them: they stay queued."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with grpc.insecure_channel(server.address) as channel:
        pb_grpc.TaskServiceStub(channel).EnqueueTasks(
            pb.EnqueueTasksRequest(
                tasks=[
                    pb.TaskSpec(id=task_id, type=task_type, timeout=Duration(seconds=60))
                    for task_id in ids
                ]
            ),
            timeout=10,
        )
    return ids


def cancels_counted(server: Any, task_type: str) -> float:
    return metric_sum(
        server.http_url, "conveyor_task_outcomes_total", type=task_type, outcome="cancelled"
    )


def test_a_cancel_cut_off_by_its_deadline_lands_and_is_counted_once(
    server: Any, db: Db, database_url: str
) -> None:
    (task_id,) = queued(server, "cut-off-cancel")
    request = pb.CancelTaskRequest(task_id=task_id)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TaskServiceStub(channel)
        cut_off_while_blocked(
            db,
            database_url,
            server,
            "CancelTask",
            lambda timeout: stub.CancelTask.future(request, timeout=timeout),
            # Not waiting for the server's cancellation: the cancel outlives the call,
            # which ends only once it has committed (a cancel cut off during its COMMIT
            # could land uncounted).
            server_cancels_first=False,
        )
        wait_for(
            lambda: db.task(task_id)["state"] == "cancelled",
            what="the cut-off cancel to commit",
        )
        retry = stub.CancelTask(request, timeout=10)
    assert retry.task.state == pb.TASK_STATE_CANCELLED  # a no-op, rightly not counted again
    cancelled = wait_for(
        lambda: cancels_counted(server, "cut-off-cancel"), what="the cancel to be counted"
    )
    assert cancelled == 1


@pytest.mark.parametrize("by", ["ids", "filter"])
def test_a_bulk_cancel_cut_off_by_its_deadline_is_counted_once(
    server: Any, db: Db, database_url: str, by: str
) -> None:
    task_type = f"cut-off-bulk-{by}"
    ids = queued(server, task_type, count=3)
    request = (
        pb.BulkTaskRequest(task_ids=ids)
        if by == "ids"
        else pb.BulkTaskRequest(filter=pb.TaskFilter(type=task_type))
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.AdminServiceStub(channel)
        cut_off_while_blocked(
            db,
            database_url,
            server,
            "CancelTasks",
            lambda timeout: stub.CancelTasks.future(request, timeout=timeout),
            server_cancels_first=False,
        )
        wait_for(
            lambda: (
                db.fetchval(
                    "SELECT count(*) FROM conveyor_tasks WHERE type = $1 AND state = 'cancelled'",
                    task_type,
                )
                == len(ids)
            ),
            what="the cut-off batch to commit",
        )
        retry = stub.CancelTasks(request, timeout=10)
    assert retry.changed == 0  # nothing left to cancel
    cancelled = wait_for(lambda: cancels_counted(server, task_type), what="the cancels counted")
    assert cancelled == len(ids)
    actions = metric_sum(server.http_url, "conveyor_operator_actions_total", action="cancel")
    assert actions >= len(ids)  # other tests' actions share the server's counter
