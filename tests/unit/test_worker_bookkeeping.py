"""The worker runtime's books on an attempt whose outcome is on its way to the server.

Driven on the real runtime of a real Worker, whose only server is an address nothing listens
on: every report fails as unreachable and is retried, so an attempt stays finished and
unreported for as long as the test needs. (End to end, the race this covers, a heartbeat
answered between the commit of a success and the worker reading the success's answer, could
not be forced without timing: a heartbeat held by a lock until the success commits is
answered after the success's own answer has been read.)
"""

from __future__ import annotations

import asyncio
import logging
import socket
from datetime import timedelta

import pytest
from helpers import async_wait_for, free_port, started_runtime

from conveyor import Worker
from conveyor.breaker import BreakerPolicy, BreakerState
from conveyor.client.channel import AddressRing
from conveyor.protocol import convert
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.worker.runtime import _Unreachable

TYPE = "books.job"


def dead_address() -> str:
    """An address nothing listens on: every call fails at once with UNAVAILABLE.

    From `free_port`, not a port the kernel picked and released: another test process's
    server, bound to port 0, could be given that one next.
    """
    return f"127.0.0.1:{free_port()}"


def lease(task_id: str) -> pb.Lease:
    return pb.Lease(
        task_id=task_id,
        lease_id=f"lease-of-{task_id}",
        type=TYPE,
        attempt=1,
        max_retries=3,
        timeout=convert.duration(timedelta(seconds=30)),
    )


async def test_a_stop_order_for_an_attempt_being_reported_is_not_a_lost_lease(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The handler succeeded and its report is on its way; a heartbeat's answer then says
    the lease is over (the success committed after the heartbeat named the lease).

    The worker used to log "stopping task ...: its lease was lost" for a task that had
    succeeded, and counted nothing else; now the stop order changes nothing.
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    worker = Worker(dead_address(), concurrency=1)
    worker.register_handler(TYPE, lambda _ctx, payload: payload)
    runtime = await started_runtime(worker)
    try:
        runtime.begin(lease("t1"), traced=False)
        attempt = runtime.attempts["t1"]
        # Its handler has returned and its report is being retried.
        await async_wait_for(lambda: runtime.unreported == 1, timeout=5, what="the report")

        runtime.apply_stops(
            [pb.LeaseToStop(task_id="t1", lease_id="lease-of-t1", reason=pb.STOP_REASON_LEASE_LOST)]
        )

        assert attempt.stop_reason is None
        assert not attempt.ctx.cancelled.is_set()
        assert not [r for r in caplog.records if getattr(r, "event", None) == "task_lease_lost"]
    finally:
        for attempt in runtime.attempts.values():
            if attempt.runner is not None:
                attempt.runner.cancel()
        await asyncio.gather(
            *(a.runner for a in runtime.attempts.values() if a.runner), return_exceptions=True
        )
        await runtime.close_channels()
        runtime.pool.shutdown()


def silent_address() -> tuple[socket.socket, str]:
    """A socket that listens and never answers: a call to it waits for its whole deadline.

    Returns (the socket, to close when done; its address).
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock, f"127.0.0.1:{sock.getsockname()[1]}"


async def test_no_heartbeat_is_forced_while_another_call_holds_the_probe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The only server's breaker is half-open and a report holds the probe, waiting for an
    answer that does not come; meanwhile the lease loop looks again and again.

    The lease loop used to ask for a heartbeat at each look (every 0.25 s): each was refused
    at once, "every server's circuit breaker is open", a warning and a counted heartbeat
    failure each time. Now it waits for the probe's answer without asking.
    """
    caplog.set_level(logging.WARNING, logger="conveyor")
    listener, address = silent_address()
    worker = Worker(address, concurrency=1)
    worker.register_handler(TYPE, lambda _ctx, payload: payload)
    runtime = await started_runtime(worker)
    # Only the forced heartbeats may fall within the test, not the regular ones.
    runtime.heartbeat_interval = timedelta(minutes=10)
    runtime.ring = AddressRing([address], BreakerPolicy(reset_timeout=0.1))
    breaker = runtime.ring.breakers[address]
    loops: list[asyncio.Task[None]] = []
    try:
        for _ in range(breaker.policy.failure_threshold):
            permit = breaker.allow()
            assert permit is not None
            breaker.record_failure(permit)
        await async_wait_for(
            lambda: breaker.state is BreakerState.HALF_OPEN, timeout=5, what="half-open"
        )
        report = pb.ReportResultRequest(
            worker_id=worker.worker_id, task_id="t1", lease_id="l1", outcome=pb.OUTCOME_RELEASED
        )
        # Created first, so it runs first and takes the probe before the loops look.
        held = asyncio.create_task(runtime.call("ReportResult", report, timeout=1.5))
        loops = [
            asyncio.create_task(runtime.heartbeat_loop()),
            asyncio.create_task(runtime.lease_loop()),
        ]
        await async_wait_for(
            lambda: not breaker.probe_free(), timeout=5, what="the report to take the probe"
        )
        refusal = runtime.refused(probe=False)
        assert "a probe is in flight" in str(refusal)

        with pytest.raises(_Unreachable, match="DEADLINE_EXCEEDED"):
            await held
        failures = worker.metrics.registry.get_sample_value(
            "conveyor_worker_heartbeat_failures_total"
        )
        assert not failures
        assert not [r for r in caplog.records if getattr(r, "event", None) == "heartbeat_failed"]
    finally:
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await runtime.close_channels()
        runtime.pool.shutdown()
        listener.close()
