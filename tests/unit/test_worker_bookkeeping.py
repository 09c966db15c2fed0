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
from helpers import async_wait_for

from conveyor import Worker
from conveyor.protocol import convert
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.worker.runtime import _Runtime

TYPE = "books.job"


def dead_address() -> str:
    """An address nothing listens on: every call fails at once with UNAVAILABLE."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def lease(task_id: str) -> pb.Lease:
    return pb.Lease(
        task_id=task_id,
        lease_id=f"lease-of-{task_id}",
        type=TYPE,
        attempt=1,
        max_retries=3,
        timeout=convert.duration(timedelta(seconds=30)),
    )


async def started_runtime(worker: Worker) -> _Runtime:
    """The runtime as `main` sets it up once registered, without its loops."""
    runtime = _Runtime(worker, timedelta(seconds=1))
    runtime.loop = asyncio.get_running_loop()
    runtime.stop_event = asyncio.Event()
    runtime.drain_cut = asyncio.Event()
    runtime.slot_freed = asyncio.Event()
    runtime.heartbeat_now = asyncio.Event()
    return runtime


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
