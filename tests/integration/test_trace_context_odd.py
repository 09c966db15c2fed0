"""Trace context from a raw gRPC client that is not W3C at all."""

from __future__ import annotations

import uuid

import grpc
import pytest
from helpers import wait_final

from conveyor import Client, TaskState, Worker
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")


@pytest.mark.parametrize(
    "context",
    [
        {"traceparent": "garbage"},
        {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},  # invalid all-zero ids
        {"traceparent": "ff-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": "=,=,,"},
        {"baggage": "k=" + "v" * 500, "uber-trace-id": "x" * 512, "traceparent": "\u2603" * 512},
    ],
)
def test_a_malformed_trace_context_does_not_fail_the_task(server, context) -> None:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, sdk_trace.TracerProvider):
        trace.set_tracer_provider(sdk_trace.TracerProvider())
    worker = Worker(server.address)
    worker.register_handler("raw.traced", lambda _ctx, payload: payload)
    worker.start()
    try:
        task_id = str(uuid.uuid4())
        spec = pb.TaskSpec(
            id=task_id, type="raw.traced", timeout={"seconds": 10}, trace_context=context
        )
        with grpc.insecure_channel(server.address) as channel:
            pb_grpc.TaskServiceStub(channel).EnqueueTasks(
                pb.EnqueueTasksRequest(tasks=[spec]), timeout=10
            )
        with Client(server.address) as client:
            status = wait_final(client, task_id)
    finally:
        worker.stop()
    assert status.state is TaskState.SUCCEEDED, status.last_error
