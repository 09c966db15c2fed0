"""Request limits on a real server: per-token request rate, concurrent calls per server.

A limit answers RESOURCE_EXHAUSTED with a message saying which limit and when to retry
(the clients raise LimitExceeded), counts the refusal in a metric, and leaves everything
else working: a worker keeps running tasks while its producer is being metered.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import wait_final, wait_for

from conveyor import Client, RetryPolicy, Task, TaskState, Worker
from conveyor.auth import Role, new_token
from conveyor.errors import LimitExceeded
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server.security import RateLimiter

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from conftest import ServerThread


# A short budget: the test wants to see the client give up, not wait for 30 s.
QUICK = RetryPolicy(total_timeout=timedelta(seconds=1.5))


class TestRateLimiter:
    def test_bursts_then_the_average_rate(self) -> None:
        now = [0.0]
        limiter = RateLimiter(rate=10, burst=3, clock=lambda: now[0])
        assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
        assert limiter.take("a") == pytest.approx(0.1)
        assert limiter.take("b") == 0.0  # buckets are per key
        now[0] = 0.1
        assert limiter.take("a") == 0.0
        assert limiter.take("a") > 0
        now[0] = 100.0  # refills to the burst, not beyond
        assert [limiter.take("a") for _ in range(4)][-1] > 0


class TestRequestRate:
    def test_the_client_waits_out_a_short_refill(
        self, start_server: Callable[..., ServerThread], tmp_path: Path
    ) -> None:
        """Backpressure, not an error: a refill within the budget is waited for."""
        token, entry = new_token("app", Role.PRODUCER)
        tokens = tmp_path / "tokens.toml"
        tokens.write_text(entry.as_toml())
        server = start_server(tokens_file=tokens, rate_limit=20.0, rate_burst=1.0)
        with Client(server.address, token=token) as client:
            task_id = client.enqueue_task(Task(type="t", payload=b""))
            for _ in range(5):  # each finds the bucket empty and waits ~50 ms
                assert client.get_task_status(task_id).state is TaskState.QUEUED
        assert server.server is not None
        assert server.server.metrics.limit_refusals.labels("request_rate")._value.get() >= 1

    def test_a_token_over_its_rate_is_refused_and_others_are_not_held_back(
        self, start_server: Callable[..., ServerThread], tmp_path: Path
    ) -> None:
        """Per token: one producer's burst neither stops another producer nor the workers."""
        (busy, busy_entry), (calm, calm_entry) = (
            new_token("busy", Role.PRODUCER),
            new_token("calm", Role.PRODUCER),
        )
        worker_token, worker_entry = new_token("fleet", Role.WORKER)
        tokens = tmp_path / "tokens.toml"
        tokens.write_text("\n".join(e.as_toml() for e in (busy_entry, calm_entry, worker_entry)))
        server = start_server(tokens_file=tokens, rate_limit=0.1, rate_burst=3.0)
        worker = Worker(server.address, token=worker_token)
        worker.register_handler("t", lambda _ctx, payload: payload)
        worker.start()
        try:
            with Client(server.address, token=busy, retry=QUICK) as client:
                task_id = client.enqueue_task(Task(type="t", payload=b""))
                for _ in range(2):  # the rest of the burst of 3
                    client.get_task_status(task_id)
                # The next request would wait 10 s for a refill: past the client's budget.
                with pytest.raises(LimitExceeded) as caught:
                    client.get_task_status(task_id)
                assert "request rate limit of 0.1/s" in caught.value.message
            # Another token has its own bucket, and the worker ran the task meanwhile.
            with Client(server.address, token=calm) as other:
                status = wait_final(other, task_id)
                assert status.state is TaskState.SUCCEEDED
        finally:
            worker.stop()
        assert server.server is not None
        refused = server.server.metrics.limit_refusals.labels("request_rate")._value.get()
        assert refused >= 1

    def test_without_tokens_nothing_is_metered(
        self, start_server: Callable[..., ServerThread]
    ) -> None:
        """One shared bucket would let a busy script starve every other app: no metering."""
        server = start_server(rate_limit=1.0, rate_burst=1.0)
        with Client(server.address) as client:
            task_id = client.enqueue_task(Task(type="t", payload=b""))
            for _ in range(20):
                assert client.get_task_status(task_id).state is TaskState.QUEUED


class TestConcurrentCalls:
    def test_calls_beyond_the_server_limit_are_refused_at_once(
        self, start_server: Callable[..., ServerThread]
    ) -> None:
        """Two long polls hold the two slots; a third call is refused, not queued."""
        server = start_server(max_concurrent_rpcs=2, rate_limit=None)
        channel = grpc.insecure_channel(server.address)
        workers = pb_grpc.WorkerServiceStub(channel)
        polls = [
            workers.LeaseTasks.future(
                pb.LeaseTasksRequest(
                    worker_id=f"w{n}", task_types=["idle"], max_tasks=1, wait=Duration(seconds=5)
                ),
                timeout=15,
            )
            for n in range(2)
        ]
        assert server.server is not None
        claims = server.server.metrics.lease_claims
        try:
            # Both polls have made their first claim, so both hold a slot and wait.
            wait_for(
                lambda: sum(claims.labels(kind)._value.get() for kind in ("empty", "skipped")) >= 2,
                timeout=5,
                what="both long polls to be in progress",
            )
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.TaskServiceStub(channel).GetTask(
                    pb.GetTaskRequest(task_id="00000000-0000-0000-0000-000000000000"), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            for poll in polls:
                assert list(poll.result().leases) == []
            channel.close()
        with Client(server.address) as client:  # slots free again
            assert client.enqueue_task(Task(type="t", payload=b"", timeout=timedelta(seconds=5)))


class TestSizeLimits:
    def test_payload_and_batch_refusals_are_counted(
        self, start_server: Callable[..., ServerThread]
    ) -> None:
        """INVALID_ARGUMENT for the caller, a metric for the operator."""
        server = start_server(max_payload_bytes=10, max_batch=2)
        channel = grpc.insecure_channel(server.address)
        tasks = pb_grpc.TaskServiceStub(channel)

        def spec(payload: bytes = b"") -> pb.TaskSpec:
            return pb.TaskSpec(
                id=str(uuid.uuid4()), type="t", payload=payload, timeout=Duration(seconds=5)
            )

        for request, limit in (
            (pb.EnqueueTasksRequest(tasks=[spec(b"x" * 11)]), "payload_size"),
            (pb.EnqueueTasksRequest(tasks=[spec() for _ in range(3)]), "batch_size"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                tasks.EnqueueTasks(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "the limit is" in (caught.value.details() or "")
            assert server.server is not None
            assert server.server.metrics.limit_refusals.labels(limit)._value.get() == 1
        channel.close()
