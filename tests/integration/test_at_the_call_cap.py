"""Clients and workers that meet the server's concurrent-call cap.

`--max-concurrent-rpcs` refuses a call beyond the cap with RESOURCE_EXHAUSTED at once
(docs/security.md, "Limits"); the docs say a client refused so "waits and retries within
its retry budget", and a worker retries the same way. Here the cap is filled by raw long
polls that end after a few seconds, and a producer and a worker arrive meanwhile.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc
from google.protobuf.duration_pb2 import Duration
from helpers import wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import ServerThread

SLOTS = 4
HOLD_SECONDS = 3


def hold_every_slot(server: ServerThread) -> tuple[grpc.Channel, list[grpc.Future]]:
    """SLOTS long polls that each hold a call slot for HOLD_SECONDS, then end."""
    channel = grpc.insecure_channel(server.address)
    workers = pb_grpc.WorkerServiceStub(channel)
    polls = [
        workers.LeaseTasks.future(
            pb.LeaseTasksRequest(
                worker_id=f"holder{n}",
                task_types=["held.idle"],
                max_tasks=1,
                wait=Duration(seconds=HOLD_SECONDS),
            ),
            timeout=30,
        )
        for n in range(SLOTS)
    ]
    assert server.server is not None
    claims = server.server.metrics.lease_claims
    wait_for(
        lambda: sum(claims.labels(kind)._value.get() for kind in ("empty", "skipped")) >= SLOTS,
        timeout=10,
        what="every slot to be held",
    )
    return channel, polls


def test_a_producer_at_the_cap_waits_and_enqueues_once(
    start_server: Callable[..., ServerThread], db: object
) -> None:
    server = start_server(max_concurrent_rpcs=SLOTS, rate_limit=None)
    channel, polls = hold_every_slot(server)
    try:
        with Client(server.address) as client:
            task = Task(type="held.t", payload=b"x")
            started = time.monotonic()
            task_id = client.enqueue_task(task)
            # It waited for the polls to end (about HOLD_SECONDS), then went through.
            assert 1.0 < time.monotonic() - started < 25
            assert client.get_task_status(task_id).state is TaskState.QUEUED
    finally:
        for poll in polls:
            poll.result()
        channel.close()


def test_a_worker_started_at_the_cap_runs_tasks_once_slots_free(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(max_concurrent_rpcs=SLOTS, rate_limit=None)
    channel, polls = hold_every_slot(server)
    worker = Worker(server.address, concurrency=1)
    worker.register_handler("held.t", lambda _ctx, payload: payload)
    try:
        worker.start()
        for poll in polls:
            poll.result()
        with Client(server.address) as client:
            task_id = client.enqueue_task(Task(type="held.t", payload=b"x"))
            assert wait_final(client, task_id, timeout=20).state is TaskState.SUCCEEDED
    finally:
        worker.stop()
        channel.close()


async def test_an_async_producer_at_the_cap_waits_and_enqueues_once(
    start_server: Callable[..., ServerThread],
) -> None:
    import asyncio  # noqa: PLC0415

    from conveyor import AsyncClient  # noqa: PLC0415

    server = start_server(max_concurrent_rpcs=SLOTS, rate_limit=None)
    channel, polls = await asyncio.to_thread(hold_every_slot, server)
    try:
        async with AsyncClient(server.address) as client:
            started = time.monotonic()
            task_id = await client.enqueue_task(Task(type="held.t", payload=b"x"))
            assert 1.0 < time.monotonic() - started < 25
            assert (await client.get_task_status(task_id)).state is TaskState.QUEUED
    finally:
        for poll in polls:
            await asyncio.to_thread(poll.result)
        channel.close()
