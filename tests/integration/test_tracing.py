"""OpenTelemetry: a task's handler span joins the trace of the code that enqueued it.

A real server and an in-process worker, with the OpenTelemetry SDK recording spans in
memory. The producer's span context travels in the task (stored by the server, handed out
with the lease), so the worker's CONSUMER span is a child of the client's PRODUCER span,
and spans the handler opens are children of the CONSUMER span, for async handlers and for
sync handlers running in threads alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from helpers import wait_final

from conveyor import Client, Task, TaskState, Worker
from conveyor.client.tracing import trimmed_tracestate
from conveyor.errors import InvalidTask
from conveyor.protocol import status as status_mapping
from conveyor.protocol.limits import MAX_TRACE_VALUE
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
export = pytest.importorskip("opentelemetry.sdk.trace.export")
in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")

_EXPORTER = in_memory.InMemorySpanExporter()


@pytest.fixture(scope="module")
def tracer():
    """The process-wide SDK tracer provider (OpenTelemetry allows setting it once)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, sdk_trace.TracerProvider):
        provider = sdk_trace.TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(export.SimpleSpanProcessor(_EXPORTER))
    return trace.get_tracer("tests")


@pytest.fixture
def spans(tracer) -> Iterator[in_memory.InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def by_name(exporter, name: str) -> list:
    return [span for span in exporter.get_finished_spans() if span.name == name]


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.address) as client:
        yield client


@pytest.fixture
def worker(server, tracer) -> Iterator[Worker]:
    worker = Worker(server.address, concurrency=2)

    async def async_handler(_ctx, payload):
        with tracer.start_as_current_span("inside async handler"):
            return payload

    def sync_handler(_ctx, payload):
        with tracer.start_as_current_span("inside sync handler"):
            return payload

    def flaky(ctx, payload):
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return payload

    worker.register_handler("trace.async", async_handler)
    worker.register_handler("trace.sync", sync_handler)
    worker.register_handler("trace.flaky", flaky)
    worker.start()
    yield worker
    worker.stop()


class TestPropagation:
    @pytest.mark.parametrize(
        ("task_type", "inner"),
        [("trace.async", "inside async handler"), ("trace.sync", "inside sync handler")],
    )
    def test_handler_spans_join_the_producers_trace(
        self, spans, tracer, client, worker, task_type, inner
    ) -> None:
        with tracer.start_as_current_span("checkout") as root:
            task_id = client.enqueue_task(Task(type=task_type, payload=b"x"))
        assert wait_final(client, task_id).state is TaskState.SUCCEEDED
        worker_spans = [s for s in spans.get_finished_spans() if s.name == inner]
        assert len(worker_spans) == 1  # the handler span ends before the report
        (send,) = by_name(spans, f"send {task_type}")
        (process,) = by_name(spans, f"process {task_type}")
        (child,) = worker_spans
        trace_id = root.get_span_context().trace_id
        assert {send.context.trace_id, process.context.trace_id, child.context.trace_id} == {
            trace_id
        }
        assert send.parent.span_id == root.get_span_context().span_id
        assert process.parent.span_id == send.context.span_id
        assert child.parent.span_id == process.context.span_id
        assert send.kind is trace.SpanKind.PRODUCER
        assert process.kind is trace.SpanKind.CONSUMER
        assert process.attributes["messaging.message.id"] == task_id
        assert process.attributes["messaging.destination.name"] == task_type
        assert process.attributes["conveyor.attempt"] == 1
        assert process.attributes["conveyor.worker.id"] == worker.worker_id
        assert process.attributes["conveyor.outcome"] == "succeeded"

    def test_each_attempt_is_a_span_and_a_failure_is_an_error(self, spans, client, worker) -> None:
        task_id = client.enqueue_task(Task(type="trace.flaky"))
        assert wait_final(client, task_id).state is TaskState.SUCCEEDED
        (send,) = by_name(spans, "send trace.flaky")
        attempts = sorted(
            by_name(spans, "process trace.flaky"), key=lambda s: s.attributes["conveyor.attempt"]
        )
        assert [s.attributes["conveyor.attempt"] for s in attempts] == [1, 2]
        assert all(s.parent.span_id == send.context.span_id for s in attempts)
        assert attempts[0].status.status_code is trace.StatusCode.ERROR
        assert "first attempt fails" in attempts[0].status.description
        assert attempts[1].status.status_code is trace.StatusCode.UNSET

    def test_a_bulk_enqueue_is_one_producer_span_for_every_task(
        self, spans, client, worker
    ) -> None:
        ids = client.enqueue_tasks([Task(type="trace.async") for _ in range(3)])
        for task_id in ids:
            wait_final(client, task_id)
        (send,) = by_name(spans, "send trace.async")
        assert send.attributes["messaging.batch.message_count"] == 3
        processes = by_name(spans, "process trace.async")
        assert sorted(s.attributes["messaging.message.id"] for s in processes) == sorted(ids)
        assert all(s.parent.span_id == send.context.span_id for s in processes)


class TestWhatTravels:
    def test_only_the_w3c_trace_context_is_stored_not_baggage(
        self, spans, tracer, client, db
    ) -> None:
        """Baggage can be large and is the producer's business: it stays behind."""
        baggage = pytest.importorskip("opentelemetry.baggage")
        context = pytest.importorskip("opentelemetry.context")
        token = context.attach(baggage.set_baggage("user.session", "x" * 600))
        try:
            with tracer.start_as_current_span("checkout"):
                task_id = client.enqueue_task(Task(type="trace.untouched"))
        finally:
            context.detach(token)
        stored = db.fetchval(
            "SELECT trace_context::text FROM conveyor_tasks WHERE id = $1::uuid", task_id
        )
        assert stored is not None
        assert '"traceparent"' in stored
        assert "baggage" not in stored

    def test_a_long_upstream_tracestate_is_trimmed_not_fatal(
        self, spans, tracer, client, worker, db
    ) -> None:
        """W3C lets an upstream service send 32 vendors' entries; the server stores up to
        MAX_TRACE_VALUE characters of it. A traced enqueue under such a parent used to fail
        with InvalidTask on every call; the client now trims the tracestate as W3C says
        (members over 128 characters first, then from the end), and the trace goes on."""
        propagate = pytest.importorskip("opentelemetry.propagate")
        context = pytest.importorskip("opentelemetry.context")
        members = [f"vendor{n}=" + "a" * 140 for n in range(5)]  # 5 x 148 characters
        members[1] = "short=kept"
        headers = {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": ",".join(members),
        }
        assert len(headers["tracestate"]) > MAX_TRACE_VALUE
        token = context.attach(propagate.extract(headers))
        try:
            with tracer.start_as_current_span("upstream request"):
                task_id = client.enqueue_task(Task(type="trace.async", payload=b"x"))
        finally:
            context.detach(token)
        assert wait_final(client, task_id).state is TaskState.SUCCEEDED
        stored = json.loads(
            db.fetchval(
                "SELECT trace_context::text FROM conveyor_tasks WHERE id = $1::uuid", task_id
            )
        )
        kept = stored["tracestate"].split(",")
        assert len(stored["tracestate"]) <= MAX_TRACE_VALUE
        assert "short=kept" in kept
        assert kept == [m for m in members if m in kept]  # whole members, in their order
        (process,) = by_name(spans, "process trace.async")
        assert process.context.trace_id == int(headers["traceparent"][3:35], 16)

    @pytest.mark.parametrize(
        ("value", "trimmed"),
        [
            ("a=1, b=2", "a=1,b=2"),
            ("a=" + "x" * 600, ""),
            (",".join([f"v{n}=" + "x" * 100 for n in range(6)]), None),
        ],
        ids=["short-as-is", "one-huge-member-dropped", "dropped-from-the-end"],
    )
    def test_trimming_follows_w3c(self, value: str, trimmed: str | None) -> None:
        result = trimmed_tracestate(value)
        if trimmed is not None:
            assert result == trimmed
        else:
            assert result == ",".join(value.split(",")[:4])  # 4 x 105 + 3 commas fit


class TestServerLimits:
    def test_nul_in_trace_context_is_invalid(self, server) -> None:
        spec = pb.TaskSpec(
            id="0190b5d2-0000-7000-8000-0000000000ab",
            type="trace.async",
            timeout={"seconds": 10},
            trace_context={"traceparent": "00-\x00"},
        )
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[spec]), timeout=10)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "NUL" in raised.value.details()

    def test_oversized_trace_context_is_invalid(self, server) -> None:
        """The context rides along with every lease, so its size is bounded."""
        spec = pb.TaskSpec(
            id="0190b5d2-0000-7000-8000-0000000000aa",
            type="trace.async",
            timeout={"seconds": 10},
            trace_context={f"k{i}": "v" for i in range(9)},
        )
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[spec]), timeout=10)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "trace_context has 9 entries" in raised.value.details()
        error = status_mapping.error_from_status(raised.value.code(), raised.value.details())
        assert isinstance(error, InvalidTask)


def test_no_span_work_without_a_configured_tracer() -> None:
    """The API alone (no SDK provider set) makes every span a no-op: Conveyor skips them,
    which profiling showed costs workers a few percent per task otherwise."""
    probe = (
        "from conveyor.client import tracing\n"
        "assert not tracing.enabled()\n"
        "with tracing.enqueue_span(['t'], 1) as carrier:\n"
        "    assert carrier == {}\n"
        "with tracing.handler_span(task_type='t', task_id='i', attempt=1, worker_id='w',"
        " trace_context={'traceparent': '00-' + '1' * 32 + '-' + '2' * 16 + '-01'}) as span:\n"
        "    assert span is None\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
