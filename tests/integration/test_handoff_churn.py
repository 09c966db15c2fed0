"""No handed-over (or claimed) lease is stranded while producers and consumers churn.

Real server, real PostgreSQL. Producers enqueue single tasks on several channels (so the
server's group commit has two inserts in flight), while Work streams and LeaseTasks long
polls come and go, cancelled or half-closed at random points, many of them while the
server writes them a lease with its remaining room on offer at the handoff desk.

The server runs in this process, so the test records every lease the server actually sent
(`observe_starts` is called for a lease message whose write completed, and for a
LeaseTasks reply). When the churn stops and every consumer has gone, every task still
`running` must hold a lease the server sent (one on the wire when its stream was
cancelled is the documented lost-reply case). A running task whose lease was never sent
and never handed back is stranded: it would wait for its lease to expire and lose an
attempt.
"""

from __future__ import annotations

import contextlib
import functools
import random
import threading
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import wait_for
from work_streams import ENDED, RawStream

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import Callable

TYPES = ("zz.a", "zz.b")
CHURN_SECONDS = 6.0


def _producer(address: str, stop: threading.Event, seed: int, flowing: threading.Event) -> None:
    rng = random.Random(seed)
    channel = grpc.insecure_channel(address)
    tasks = pb_grpc.TaskServiceStub(channel)
    try:
        while not stop.is_set():
            if not flowing.wait(timeout=0.1):
                continue
            specs = [
                pb.TaskSpec(
                    id=str(uuid.uuid4()),
                    type=rng.choice(TYPES),
                    timeout=Duration(seconds=60),
                    max_retries=3,
                )
                for _ in range(rng.choice((1, 1, 1, 2, 3)))
            ]
            with contextlib.suppress(grpc.RpcError):
                tasks.EnqueueTasks(pb.EnqueueTasksRequest(tasks=specs), timeout=10)
    finally:
        channel.close()


def _stream_consumer(address: str, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    channel = grpc.insecure_channel(address)
    workers = pb_grpc.WorkerServiceStub(channel)
    try:
        while not stop.is_set():
            worker_id = f"zz-stream-{uuid.uuid4().hex[:8]}"
            stream = RawStream(workers)
            stream.send(worker_id=worker_id, task_types=list(TYPES), grant=rng.randint(1, 4))
            # Live a short, random while (fuzz timing, not synchronisation), granting now
            # and then, then leave by cancelling or by half-closing.
            lives_until = time.monotonic() + rng.uniform(0.0, 0.08)
            while (left := lives_until - time.monotonic()) > 0:
                try:
                    response = stream.take(timeout=left)
                except Exception:  # queue.Empty
                    break
                if not isinstance(response, pb.WorkResponse):
                    break
                if response.leases and rng.random() < 0.5:
                    stream.send(grant=len(response.leases))
            if rng.random() < 0.6:
                stream.close()  # cancel: the worker went away
            else:
                stream.half_close()
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    response = stream.take(timeout=10)
                    if response is ENDED or not isinstance(response, pb.WorkResponse):
                        break
                stream.close()
    finally:
        channel.close()


def _poll_consumer(address: str, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    channel = grpc.insecure_channel(address)
    workers = pb_grpc.WorkerServiceStub(channel)
    try:
        while not stop.is_set():
            request = pb.LeaseTasksRequest(
                worker_id=f"zz-poll-{uuid.uuid4().hex[:8]}",
                task_types=list(TYPES),
                max_tasks=rng.randint(1, 3),
                wait=Duration(seconds=5),
            )
            call = workers.LeaseTasks.future(request, timeout=15)
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0.0, 0.03))  # fuzz: cancel at a random point
                call.cancel()
            with contextlib.suppress(grpc.RpcError, grpc.FutureCancelledError):
                call.result(timeout=15)
    finally:
        channel.close()


def _hand_over_into_an_empty_queue(
    address: str, queued: Callable[[], int], handed_over: Callable[[], int]
) -> None:
    """With the producers paused: cancel the backlog, then trickle tasks in until one is
    handed over (each enqueued only while nothing is queued)."""
    channel = grpc.insecure_channel(address)
    admin = pb_grpc.AdminServiceStub(channel)
    tasks = pb_grpc.TaskServiceStub(channel)

    def cleared() -> bool:
        admin.CancelTasks(
            pb.BulkTaskRequest(
                filter=pb.TaskFilter(states=[pb.TASK_STATE_QUEUED]), reason="test backlog"
            ),
            timeout=30,
        )
        return queued() == 0

    def trickled() -> int:
        if queued() == 0:
            spec = pb.TaskSpec(
                id=str(uuid.uuid4()), type=TYPES[0], timeout=Duration(seconds=60), max_retries=3
            )
            tasks.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[spec]), timeout=30)
        return handed_over()

    try:
        wait_for(cleared, timeout=30, interval=0.2, what="the backlog cancelled")
        wait_for(trickled, timeout=30, interval=0.05, what="a task handed over")
    finally:
        channel.close()


@pytest.mark.slow
def test_no_lease_is_stranded_under_churn(start_server, db) -> None:
    server = start_server(poll_interval=timedelta(milliseconds=200))
    service: Any = server.server.worker_service
    sent: set[str] = set()
    observe = service.observe_starts

    def recording(rows: list[Any]) -> None:
        sent.update(str(row["lease_id"]) for row in rows)
        observe(rows)

    service.observe_starts = recording
    # Leases written by an enqueue's own insert (the handoff), counted where the server
    # settles them: a handed-over task later handed back and claimed again keeps no mark of
    # it in its row.
    handed_over: list[int] = [0]
    settle = service.handoff.settle

    def counting(chosen: list[Any], rows: list[Any]) -> None:
        handed_over[0] += sum(1 for row in rows if row is not None and row["leased"])
        settle(chosen, rows)

    service.handoff.settle = counting

    def queued() -> int:
        found: int = db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'queued'")
        return found

    stop = threading.Event()
    flowing = threading.Event()
    flowing.set()
    consumers = [
        *((functools.partial(_producer, flowing=flowing), n) for n in range(4)),
        *((_stream_consumer, 100 + n) for n in range(6)),
        *((_poll_consumer, 200 + n) for n in range(3)),
    ]
    threads = [
        threading.Thread(target=run, args=(server.address, stop, seed), daemon=True)
        for run, seed in consumers
    ]
    for thread in threads:
        thread.start()
    stop.wait(CHURN_SECONDS)
    # The churn must reach the handoff to test it, and a task is handed over only when no
    # older one of its type is queued. On a loaded machine the producers outrun the
    # consumers for the whole churn (with the cores busy: a backlog of 150 after 6 s, and of
    # 1,100 after 36 s, where an idle machine hands over hundreds of tasks in 6 s). Then the
    # producers pause, an operator's bulk cancel clears the backlog (a queued task holds no
    # lease: nothing the check below needs), and one task at a time goes into the empty
    # queue while the consumers churn on, until one is handed over.
    try:
        if not handed_over[0]:
            flowing.clear()
            _hand_over_into_an_empty_queue(server.address, queued, lambda: handed_over[0])
    finally:
        # Also on a failure: consumers still streaming when the server stops would bury it
        # under their own errors.
        stop.set()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)

    def stranded() -> list[Any]:
        rows = db.fetch(
            "SELECT id, lease_id, worker_id, attempt FROM conveyor_tasks WHERE state = 'running'"
        )
        return [row for row in rows if str(row["lease_id"]) not in sent]

    # Hand-backs run in the background: give them time (well under the 30 s lease).
    with contextlib.suppress(pytest.fail.Exception):
        wait_for(lambda: not stranded(), timeout=12, interval=0.1, what="hand-backs")
    left = stranded()
    details = [
        (
            str(row["id"]),
            row["worker_id"],
            [(event["event"], event["detail"]) for event in db.events(str(row["id"]))],
        )
        for row in left[:5]
    ]
    assert not left, f"{len(left)} running tasks hold a lease never sent nor handed back: {details}"
