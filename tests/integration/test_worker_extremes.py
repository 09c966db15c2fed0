"""The worker framework at its extremes: thousands of slots, hung handlers, large payloads."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta

import pytest
from helpers import wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker

pytestmark = pytest.mark.slow  # thousands of handlers and large payloads


def test_timeout_shorter_than_heartbeat_interval(start_server) -> None:
    """Tasks whose timeout (0.4 s) is well under the heartbeat interval (3 s)."""
    server = start_server()
    client = Client(server.address)

    def ok(ctx, payload):
        left = ctx.time_left().total_seconds()
        time.sleep(0.15)
        return str(left).encode()

    def slow(ctx, payload):
        ctx.cancelled.wait(5)
        return b"late"

    worker = Worker(server.address, concurrency=8, lease_wait=1)
    worker.register_handler("ok", ok)
    worker.register_handler("slow", slow)
    worker.start()
    try:
        short = timedelta(milliseconds=400)
        oks = client.enqueue_tasks(
            [Task(type="ok", timeout=short, max_retries=0) for _ in range(20)]
        )
        slows = client.enqueue_tasks(
            [Task(type="slow", timeout=short, max_retries=0) for _ in range(4)]
        )
        for task_id in oks:
            status = wait_final(client, task_id, timeout=30)
            assert status.state is TaskState.SUCCEEDED, status
            assert 0 < float(status.result) <= 0.4 + 0.5, status.result
        for task_id in slows:
            status = wait_final(client, task_id, timeout=30)
            assert status.state is TaskState.FAILED
            assert status.last_error.startswith("TimeoutError: the handler ran past"), status
    finally:
        worker.stop()
        client.close()


def test_hung_handlers_keep_leases_and_stop_gracefully(start_server, db) -> None:
    """All handlers hang (ignoring ctx.cancelled): leases stay renewed well past the lease
    TTL, and stop() with drain_timeout=1 returns promptly, handing every task back."""
    server = start_server(heartbeat_interval=timedelta(seconds=1), lease_ttl=timedelta(seconds=3))
    client = Client(server.address)
    forever = threading.Event()

    def hang(ctx, payload):
        forever.wait(60)

    async def ahang(ctx, payload):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            forever.wait(0)  # swallows its cancellation
            await asyncio.sleep(60)

    worker = Worker(server.address, concurrency=4, lease_wait=1, drain_timeout=1)
    worker.register_handler("hang", hang)
    worker.register_handler("ahang", ahang)
    worker.start()
    try:
        ids = client.enqueue_tasks([Task(type="hang", max_retries=3) for _ in range(2)])
        ids += client.enqueue_tasks([Task(type="ahang", max_retries=3) for _ in range(2)])
        wait_for(
            lambda: all(client.get_task_status(t).state is TaskState.RUNNING for t in ids),
            timeout=20,
            what="all running",
        )
        time.sleep(7)  # more than two lease TTLs
        for task_id in ids:
            status = client.get_task_status(task_id)
            assert status.state is TaskState.RUNNING, status
            assert status.attempts == 1, status
        began = time.monotonic()
        worker.stop()
        took = time.monotonic() - began
        assert took < 10, took
        for task_id in ids:
            status = client.get_task_status(task_id, history=True)
            assert status.state is TaskState.QUEUED, status
            assert [e.event for e in status.history][-1] == "released", status.history
    finally:
        forever.set()
        worker.stop()
        client.close()


def test_two_hundred_sync_handlers(start_server) -> None:
    """200 sync handlers at once, each using ctx APIs from its thread."""
    server = start_server()
    client = Client(server.address)
    lock = threading.Lock()
    state = {"running": 0, "peak": 0}
    release = threading.Event()

    def work(ctx, payload):
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
        try:
            assert ctx.time_left().total_seconds() > 0
            ctx.heartbeat(f"{ctx.task_id} working")
            release.wait(30)
            assert not ctx.cancelled.is_set()
            ctx.heartbeat()
            return ctx.task_id.encode()
        finally:
            with lock:
                state["running"] -= 1

    worker = Worker(server.address, concurrency=200, lease_wait=1)
    worker.register_handler("work", work)
    worker.start()
    try:
        ids = client.enqueue_tasks([Task(type="work", max_retries=0) for _ in range(300)])
        wait_for(lambda: state["running"] >= 200, timeout=60, what="200 running")
        time.sleep(1.5)
        assert state["peak"] == 200
        release.set()
        for task_id in ids:
            status = wait_final(client, task_id, timeout=60)
            assert status.state is TaskState.SUCCEEDED, status
            assert status.result == task_id.encode()
    finally:
        release.set()
        worker.stop()
        client.close()
    assert state["peak"] == 200


def test_two_thousand_async_handlers(start_server) -> None:
    """2000 async handlers at once; throughput and no more than 2000."""
    server = start_server()
    client = Client(server.address)
    state = {"running": 0, "peak": 0, "done": 0}

    async def work(ctx, payload):
        state["running"] += 1
        state["peak"] = max(state["peak"], state["running"])
        try:
            await asyncio.sleep(3)
        finally:
            state["running"] -= 1
            state["done"] += 1

    worker = Worker(server.address, concurrency=2000, lease_wait=1)
    worker.register_handler("work", work)
    worker.start()
    try:
        ids = client.enqueue_tasks([Task(type="work", max_retries=0) for _ in range(4000)])
        began = time.monotonic()
        wait_for(lambda: state["done"] >= 4000, timeout=120, what="4000 done")
        # 4,000 tasks of 3 s on 2,000 slots: two rounds, not four.
        assert time.monotonic() - began < 60
        for task_id in ids[::200]:
            assert wait_final(client, task_id, timeout=30).state is TaskState.SUCCEEDED
    finally:
        worker.stop()
        client.close()
    assert state["peak"] == 2000, state


def test_large_payloads_at_concurrency(start_server) -> None:
    """~1 MiB payloads and results, 64 at once."""
    server = start_server()
    client = Client(server.address)
    size = 1024 * 1024 - 4096

    async def echo(ctx, payload):
        await asyncio.sleep(0.5)
        return payload[::-1]

    worker = Worker(server.address, concurrency=64, lease_wait=1)
    worker.register_handler("echo", echo)
    worker.start()
    try:
        payloads = [bytes([i]) * (size - 1) + b"x" for i in range(128)]
        ids = [client.enqueue_task(Task(type="echo", payload=p, max_retries=0)) for p in payloads]
        for task_id, payload in zip(ids, payloads, strict=True):
            status = wait_final(client, task_id, timeout=120)
            assert status.state is TaskState.SUCCEEDED, status
            assert status.result == payload[::-1]
            assert status.attempts == 1
    finally:
        worker.stop()
        client.close()
