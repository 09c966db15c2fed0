"""Clients and workers with several server addresses: failover, retries, circuit breakers.

A "dead" address is a port on 127.0.0.1 with nothing listening: every call to it fails at
once with UNAVAILABLE, the way a crashed server's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from faults.proxy import FaultProxy
from helpers import async_wait_for, free_port, wait_final

from conveyor import AsyncClient, Client, RetryPolicy, Task, TaskState, Worker
from conveyor.breaker import BreakerPolicy, BreakerState
from conveyor.client import channel as channel_module
from conveyor.errors import CircuitOpen, ServerUnavailable, TaskNotFound

TYPE = "failover.job"

FAST_RETRY = RetryPolicy(
    total_timeout=timedelta(seconds=2),
    call_timeout=timedelta(milliseconds=200),
    backoff_base=timedelta(milliseconds=10),
    backoff_cap=timedelta(milliseconds=50),
)
TRIP_FAST = BreakerPolicy(failure_threshold=2, reset_timeout=timedelta(seconds=10))


def dead_address() -> str:
    """An address nothing listens on."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def first_address_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every AddressRing start at its first address instead of a random one."""
    fake = SimpleNamespace(randrange=lambda _n: 0, uniform=random.uniform)
    monkeypatch.setattr(channel_module, "random", fake)


@contextlib.contextmanager
def shutting_down_server() -> Iterator[tuple[str, list[str]]]:
    """A gRPC server that drops every call with CANCELLED, as a stopping server does.

    grpc-core cancels calls it received but had not yet handed to a handler when the
    server shuts down (grpc/grpc#41785); the client sees CANCELLED, not UNAVAILABLE.
    Yields its address and the methods it was called with.
    """
    methods: list[str] = []

    def drop(_request: Any, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        raise AssertionError  # abort raises

    class Dropping(grpc.GenericRpcHandler):
        def service(self, handler_call_details: Any) -> Any:
            methods.append(handler_call_details.method)
            # A stream is dropped as it opens, before any message, as grpc-core drops it;
            # a unary handler would first wait for a request the client never sends
            # before the server accepts the stream.
            if handler_call_details.method.endswith("Stream"):
                return grpc.stream_stream_rpc_method_handler(drop)
            return grpc.unary_unary_rpc_method_handler(drop)

    with ThreadPoolExecutor(max_workers=2) as pool:
        server = grpc.server(pool, handlers=[Dropping()])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield f"127.0.0.1:{port}", methods
        finally:
            server.stop(None).wait(10)


def count_stub_calls(client: Any) -> list[str]:
    """Record the address of every network attempt `client` makes.

    A call asks for a stub per attempt; an AsyncClient's enqueue attempt goes through
    `_enqueue_once` (its enqueue stream, and a stub only for a server without streams,
    which a dead address never says it is).
    """
    addresses: list[str] = []
    for name in ("_stub", "_enqueue_once"):
        original = getattr(client, name, None)
        if original is not None:
            setattr(client, name, _counting(original, addresses))
    return addresses


def _counting(method: Any, addresses: list[str]) -> Any:
    def counting(address: str, *args: Any, **kwargs: Any) -> Any:
        addresses.append(address)
        return method(address, *args, **kwargs)

    return counting


class TestClientFailover:
    @pytest.mark.parametrize("start_at", ["dead", "live"])
    def test_client_with_a_dead_and_a_live_address_never_fails(
        self, server, db, start_at: str, first_address_first: None
    ) -> None:
        """Twenty enqueues and reads succeed whichever address the client starts with."""
        dead = dead_address()
        addresses = [dead, server.address] if start_at == "dead" else [server.address, dead]
        breaker = BreakerPolicy(failure_threshold=1, reset_timeout=timedelta(seconds=60))
        with Client(addresses, breaker=breaker) as client:
            assert client._ring.current == addresses[0]
            ids = []
            for index in range(20):
                task_id = client.enqueue_task(Task(type=TYPE, payload=str(index).encode()))
                assert client.get_task_status(task_id).state is TaskState.QUEUED
                ids.append(task_id)
            dead_state = client._ring.breakers[dead].state
            live_state = client._ring.breakers[server.address].state
            current = client._ring.current

        assert len(set(ids)) == 20
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == 20
        assert current == server.address
        assert live_state is BreakerState.CLOSED
        if start_at == "dead":
            # Tried once, failed, skipped from then on.
            assert dead_state is BreakerState.OPEN
        else:
            # Calls stay on the address that answers: the dead one was never needed.
            assert dead_state is BreakerState.CLOSED


class TestCircuitOpen:
    def test_client_fails_fast_once_every_breaker_is_open(self) -> None:
        """With its only server dead the Client raises CircuitOpen in < 3 s, then at once."""
        dead = dead_address()
        with Client(dead, retry=FAST_RETRY, breaker=TRIP_FAST) as client:
            attempts = count_stub_calls(client)
            started = time.monotonic()
            with pytest.raises(CircuitOpen) as first:
                client.enqueue_task(Task(type=TYPE))
            first_took = time.monotonic() - started
            tried = len(attempts)

            started = time.monotonic()
            with pytest.raises(CircuitOpen) as second:
                client.get_task_status(str(uuid.uuid4()))
            second_took = time.monotonic() - started
            state = client._ring.breakers[dead].state

        assert isinstance(first.value, ServerUnavailable)
        assert first_took < 3.0, f"the first call took {first_took:.2f}s"
        assert tried == TRIP_FAST.failure_threshold
        assert first.value.retry_in > 5
        assert second_took < 0.5, f"the second call took {second_took:.2f}s"
        assert len(attempts) == tried, "the second call went to the network"
        assert second.value.retry_in > 5
        assert state is BreakerState.OPEN

    async def test_async_client_fails_fast_once_every_breaker_is_open(self) -> None:
        """AsyncClient: CircuitOpen in < 3 s with its only server dead, then at once."""
        dead = dead_address()
        async with AsyncClient(dead, retry=FAST_RETRY, breaker=TRIP_FAST) as client:
            attempts = count_stub_calls(client)
            started = time.monotonic()
            with pytest.raises(CircuitOpen) as first:
                await client.enqueue_task(Task(type=TYPE))
            first_took = time.monotonic() - started
            tried = len(attempts)

            started = time.monotonic()
            with pytest.raises(CircuitOpen):
                await client.get_task_status(str(uuid.uuid4()))
            second_took = time.monotonic() - started
            state = client._ring.breakers[dead].state

        assert isinstance(first.value, ServerUnavailable)
        assert first_took < 3.0, f"the first call took {first_took:.2f}s"
        assert tried == TRIP_FAST.failure_threshold
        assert second_took < 0.5, f"the second call took {second_took:.2f}s"
        assert len(attempts) == tried, "the second call went to the network"
        assert state is BreakerState.OPEN


class TestAbandonedProbes:
    async def test_async_client_recovers_after_its_probe_is_cancelled(self, server) -> None:
        """The call that probes a half-open breaker is cancelled by its caller (an
        asyncio.timeout around it). The breaker must let the next call probe: it used to
        wait for the lost probe's verdict for ever, and refused every call once the server
        was back (CircuitOpen until the client was rebuilt)."""
        missing = str(uuid.uuid4())
        breaker = BreakerPolicy(failure_threshold=1, reset_timeout=timedelta(milliseconds=300))
        retry = RetryPolicy(
            call_timeout=timedelta(milliseconds=300),
            total_timeout=timedelta(seconds=1),
            backoff_base=timedelta(milliseconds=10),
            backoff_cap=timedelta(milliseconds=50),
        )
        with FaultProxy(server.address, name="link") as link:
            async with AsyncClient(link.address, breaker=breaker, retry=retry) as client:
                state = client._ring.breakers[link.address]
                with pytest.raises(TaskNotFound):  # an answer: the server is reachable
                    await client.get_task_status(missing)
                link.partition("blackhole")
                with pytest.raises(ServerUnavailable):
                    await client.get_task_status(missing)
                await async_wait_for(
                    lambda: state.state is BreakerState.HALF_OPEN,
                    timeout=5,
                    what="the breaker to half-open",
                )
                # The probe goes out, into the black hole, and its caller gives up on it.
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await client.get_task_status(missing)
                link.pass_through()
                with pytest.raises(TaskNotFound):
                    await client.get_task_status(missing)
                assert state.state is BreakerState.CLOSED


class TestWorkerFailover:
    def test_worker_with_a_dead_first_address_registers_and_works(
        self, server, client: Client, db, first_address_first: None
    ) -> None:
        """A Worker given "dead,live" (starting at the dead one) registers and completes tasks."""
        worker = Worker(f"{dead_address()},{server.address}", concurrency=2)
        worker.register_handler(TYPE, lambda _ctx, payload: payload.upper())
        worker.start(timeout=timedelta(seconds=20))
        try:
            ids = [client.enqueue_task(Task(type=TYPE, payload=b"abc")) for _ in range(5)]
            statuses = [wait_final(client, task_id) for task_id in ids]
        finally:
            worker.stop()

        assert [s.state for s in statuses] == [TaskState.SUCCEEDED] * 5
        assert {s.result for s in statuses} == {b"ABC"}
        assert {s.worker_id for s in statuses} == {worker.worker_id}
        assert (
            db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker.worker_id)
            == "stopped"
        )


class TestCallsDroppedByAStoppingServer:
    def test_enqueue_dropped_with_cancelled_is_retried_on_the_next_server(
        self, server, db, first_address_first: None
    ) -> None:
        """An enqueue that a stopping server drops (CANCELLED) is retried on the next server."""
        with (
            shutting_down_server() as (stopping, methods),
            Client([stopping, server.address]) as client,
        ):
            assert client._ring.current == stopping
            outcome: Any
            try:
                outcome = client.enqueue_task(Task(type=TYPE, payload=b"once"))
            except Exception as exc:
                outcome = exc

        # The client's enqueue stream, dropped at the door as a call would be.
        assert methods == ["/conveyor.v1.TaskService/EnqueueStream"]
        assert isinstance(outcome, str), f"the enqueue raised {outcome!r} instead of failing over"
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == 1


class TestFailoverMidStream:
    def test_enqueues_survive_stopping_one_server(
        self, start_server, db, first_address_first: None
    ) -> None:
        """Stopping server A halfway through a stream of enqueues loses and duplicates nothing."""
        server_a = start_server()
        server_b = start_server()
        total, stop_after = 40, 20
        ids: list[str] = []
        stopper = threading.Thread(target=server_a.stop, name="stop-server-a")
        with Client([server_a.address, server_b.address]) as client:
            assert client._ring.current == server_a.address
            try:
                for index in range(total):
                    if index == stop_after:
                        stopper.start()
                    ids.append(client.enqueue_task(Task(type=TYPE, payload=str(index).encode())))
            finally:
                if stopper.ident is not None:
                    stopper.join(30)
            # The stream ended on B: A is gone.
            final_address = client._ring.current

        assert len(ids) == total
        assert len(set(ids)) == total
        assert final_address == server_b.address
        rows = db.fetch(
            "SELECT t.id::text AS id, t.payload, "
            "(SELECT count(*) FROM conveyor_task_history AS e "
            " WHERE e.task_id = t.id AND e.event = 'enqueued') AS enqueued "
            "FROM conveyor_tasks AS t"
        )
        assert sorted(row["id"] for row in rows) == sorted(ids)
        assert {row["enqueued"] for row in rows} == {1}
        payloads = {row["id"]: bytes(row["payload"]) for row in rows}
        assert [payloads[task_id] for task_id in ids] == [
            str(index).encode() for index in range(total)
        ]


# Each enqueue after the cut may wait this long for an answer: far longer than keepalive
# needs, so that only keepalive can end the wait early.
PATIENT_RETRY = RetryPolicy(call_timeout=timedelta(seconds=40), total_timeout=timedelta(seconds=60))
# What the producer clients' pings promise, as the worker's do: a ping after 10 s without a
# word from the server, given up after 5 s more. The rest is room for a loaded machine.
DEAD_CONNECTION_NOTICED_WITHIN = 15 + 5


@pytest.mark.slow
class TestSilentlyDeadConnection:
    """Server A's link becomes a black hole (no FIN, no RST) between two enqueues.

    The producer clients' pings used to wait for an answer for gRPC's ping timeout, a
    minute (recent gRPC does not apply the keepalive timeout alone), after 20 s without a
    word: the enqueue hung until its own deadline, the whole 40 s here. Now the connection
    is given up within the worker's bound and the enqueue goes to server B.
    """

    def test_client(self, start_server, db, first_address_first: None) -> None:
        server_a, server_b = start_server(), start_server()
        with FaultProxy(server_a.address, name="link-a") as link:
            try:
                with Client([link.address, server_b.address], retry=PATIENT_RETRY) as client:
                    client.enqueue_task(Task(type=TYPE, payload=b"before"))
                    link.partition("blackhole")
                    cut_at = time.monotonic()
                    client.enqueue_task(Task(type=TYPE, payload=b"after"))
                    took = time.monotonic() - cut_at
                    final_address = client._ring.current
            finally:
                link.heal()

        self.check(took, final_address, server_b.address, payloads_in(db))

    async def test_async_client(self, start_server, db, first_address_first: None) -> None:
        server_a, server_b = start_server(), start_server()
        with FaultProxy(server_a.address, name="link-a") as link:
            try:
                async with AsyncClient(
                    [link.address, server_b.address], retry=PATIENT_RETRY
                ) as client:
                    await client.enqueue_task(Task(type=TYPE, payload=b"before"))
                    link.partition("blackhole")
                    cut_at = time.monotonic()
                    await client.enqueue_task(Task(type=TYPE, payload=b"after"))
                    took = time.monotonic() - cut_at
                    final_address = client._ring.current
            finally:
                link.heal()

        # The db fixture runs its own event loop: not on this one.
        payloads = await asyncio.to_thread(payloads_in, db)
        self.check(took, final_address, server_b.address, payloads)

    @staticmethod
    def check(took: float, final_address: str, address_b: str, payloads: list[bytes]) -> None:
        """The enqueue went to B within the bound, and each task exists once."""
        assert took < DEAD_CONNECTION_NOTICED_WITHIN, f"the enqueue took {took:.1f}s"
        assert final_address == address_b
        assert payloads == [b"after", b"before"]


def payloads_in(db: Any) -> list[bytes]:
    """Every task's payload, in order."""
    return [bytes(r["payload"]) for r in db.fetch("SELECT payload FROM conveyor_tasks ORDER BY 1")]
