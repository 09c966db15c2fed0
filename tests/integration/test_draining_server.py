"""A server that has begun to drain sends long-polling workers elsewhere.

Work streams were already refused with UNAVAILABLE while a server drains; LeaseTasks
answered at once with no leases, and the worker asked again at once: an audit counted about
2,670 polls a second from one worker against a draining server. Now a poll is answered
UNAVAILABLE ("the server is stopping"), whether it arrives during the drain or was waiting
when it began, and the worker backs off to another server as it does for any outage.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import rpc_count, wait_for

from conveyor import Worker
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

LONG = "conveyor_long_rpc_duration_seconds"
TYPE = "drain.job"


def drain(server: Any) -> None:
    async def begin() -> None:
        server.server.worker_service.start_draining()

    server.call(begin)


def poll_waits(server: Any) -> bool:
    """Whether a long poll for TYPE waits on the server (it left an offer for handoffs)."""

    async def ask() -> bool:
        return TYPE in server.server.worker_service.handoff._open

    return bool(server.call(ask))


def test_a_poll_waiting_when_the_drain_begins_and_a_poll_during_it_are_unavailable(
    start_server,
) -> None:
    server = start_server(work_stream=False)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.WorkerServiceStub(channel)
        worker_id = f"w-{uuid.uuid4().hex[:8]}"
        stub.RegisterWorker(
            pb.RegisterWorkerRequest(worker_id=worker_id, task_types=[TYPE], concurrency=1),
            timeout=10,
        )
        request = pb.LeaseTasksRequest(
            worker_id=worker_id, task_types=[TYPE], max_tasks=1, wait=Duration(seconds=20)
        )
        waiting = stub.LeaseTasks.future(request, timeout=30)
        wait_for(lambda: poll_waits(server), what="the poll to wait on the server")
        drain(server)
        with pytest.raises(grpc.RpcError) as during_wait:
            waiting.result(timeout=30)
        with pytest.raises(grpc.RpcError) as after:
            stub.LeaseTasks(request, timeout=10)
    for raised in (during_wait.value, after.value):
        assert raised.code() is grpc.StatusCode.UNAVAILABLE
        assert "the server is stopping" in (raised.details() or "")


def test_a_long_polling_worker_does_not_spin_against_a_draining_server(start_server) -> None:
    server = start_server(work_stream=False)
    worker = Worker(server.address, concurrency=2)
    worker.register_handler(TYPE, lambda _ctx, _payload: None)
    worker.start()
    try:
        answered = rpc_count(server.http_url, "LeaseTasks", "OK", LONG)
        drain(server)
        wait_for(
            lambda: rpc_count(server.http_url, "LeaseTasks", "UNAVAILABLE", LONG) >= 2,
            timeout=15,
            what="the worker's polls to be answered UNAVAILABLE",
        )
        # At most the poll that was waiting when the drain began ended OK (it may have
        # returned just before); the worker did not come back for empty answers.
        assert rpc_count(server.http_url, "LeaseTasks", "OK", LONG) - answered <= 1
        refused = rpc_count(server.http_url, "LeaseTasks", "UNAVAILABLE", LONG)
        assert refused < 50, f"{refused:.0f} polls refused: the worker did not back off"
    finally:
        worker.stop(5)
