"""Raw gRPC long polls against a server, and its claim counts: for the leasing tests.

`Fleet` registers workers and runs their `LeaseTasks` long polls on threads, so a test can
hold several waiting polls and see which one gets which task; `claims` reads
`conveyor_lease_claims_total` by result from the server's /metrics.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from helpers import metric_by_label

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

LONG_POLL = 30  # seconds each test poll may wait on the server
WAITERS = 8


def claims(http_url: str, token: str | None = None) -> dict[str, float]:
    """conveyor_lease_claims_total by result."""
    return metric_by_label(http_url, "conveyor_lease_claims_total", "result", token)


class Fleet:
    """Raw long polls against one server, each from its own registered worker."""

    def __init__(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> None:
        self.channel = grpc.insecure_channel(address, options=options)
        self.tasks = pb_grpc.TaskServiceStub(self.channel)
        self.workers = pb_grpc.WorkerServiceStub(self.channel)
        self.pool = ThreadPoolExecutor(max_workers=WAITERS + 2)

    def close(self) -> None:
        # Closing the channel first cancels the polls still waiting on the server.
        self.channel.close()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def register(self, worker_id: str, task_type: str, max_tasks: int = 4) -> pb.LeaseTasksRequest:
        """Register `worker_id`; the long poll it makes (for a call the test may cancel)."""
        self.workers.RegisterWorker(
            pb.RegisterWorkerRequest(
                worker_id=worker_id,
                host="test-host",
                pid=1,
                task_types=[task_type],
                concurrency=max_tasks,
                version="test",
            ),
            timeout=10,
        )
        return pb.LeaseTasksRequest(
            worker_id=worker_id,
            task_types=[task_type],
            max_tasks=max_tasks,
            wait=Duration(seconds=LONG_POLL),
        )

    def poll(self, worker_id: str, task_type: str, max_tasks: int = 4) -> Future[list[str]]:
        """Register `worker_id` and start one long poll; its future gives the leased ids."""
        request = self.register(worker_id, task_type, max_tasks)

        def call() -> list[str]:
            response = self.workers.LeaseTasks(request, timeout=LONG_POLL + 10)
            return [lease.task_id for lease in response.leases]

        return self.pool.submit(call)

    def enqueue(self, task_type: str) -> str:
        spec = pb.TaskSpec(
            id=str(uuid.uuid4()), type=task_type, timeout=Duration(seconds=60), max_retries=0
        )
        self.tasks.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[spec]), timeout=10)
        return spec.id
