"""Handlers that do unusual things with threads, event loops and processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

from helpers import rpc_count, wait_final, wait_for

from conveyor import AsyncClient, Client, Task, TaskState, Worker


def test_sync_handlers_with_asyncio_run_threads_and_processes(start_server) -> None:
    server = start_server()
    client = Client(server.address)

    def nested(ctx, payload):
        async def enqueue_child() -> str:
            async with AsyncClient(server.address) as ac:
                return await ac.enqueue_task(Task(type="child", payload=ctx.task_id.encode()))

        child = asyncio.run(enqueue_child())
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(ctx.task_id))
        t.start()
        t.join()
        out = subprocess.run(
            [sys.executable, "-c", "print('hi')"], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "hi"
        return f"{child} {box[0]}".encode()

    def child(ctx, payload):
        return payload

    worker = Worker(server.address, concurrency=10, lease_wait=1)
    worker.register_handler("nested", nested)
    worker.register_handler("child", child)
    worker.start()
    try:
        ids = client.enqueue_tasks([Task(type="nested", max_retries=0) for _ in range(20)])
        for task_id in ids:
            status = wait_final(client, task_id, timeout=60)
            assert status.state is TaskState.SUCCEEDED, status
            child_id, own = status.result.decode().split()
            assert own == task_id
            cs = wait_final(client, child_id, timeout=60)
            assert cs.state is TaskState.SUCCEEDED
            assert cs.result == task_id.encode()
    finally:
        worker.stop()
        client.close()


def test_progress_spam_from_many_threads_is_paced(start_server) -> None:
    """ctx.heartbeat in tight loops from 50 sync threads: at most one beat per 200 ms."""
    server = start_server()
    client = Client(server.address)
    stop = threading.Event()

    def spam(ctx, payload):
        n = 0
        while not stop.is_set():
            n += 1
            ctx.heartbeat(f"step {n}")
            time.sleep(0.001)
        return b""

    worker = Worker(server.address, concurrency=50, lease_wait=1)
    worker.register_handler("spam", spam)
    worker.start()
    try:
        before = rpc_count(server.http_url, "Heartbeat", "OK")
        ids = client.enqueue_tasks([Task(type="spam", max_retries=0) for _ in range(50)])
        wait_for(
            lambda: all(client.get_task_status(t).state is TaskState.RUNNING for t in ids),
            timeout=30,
            what="all running",
        )
        began = time.monotonic()
        time.sleep(4)
        beats = rpc_count(server.http_url, "Heartbeat", "OK") - before
        took = time.monotonic() - began
        status = client.get_task_status(ids[0])
        assert status.progress
        assert status.progress.startswith("step ")
        stop.set()
        for task_id in ids:
            assert wait_final(client, task_id, timeout=30).state is TaskState.SUCCEEDED
    finally:
        stop.set()
        worker.stop()
        client.close()
    # beats during the ~5 s the handlers ran: at most one per 200 ms (+ slack)
    assert beats <= (took + 2) / 0.2 + 5, beats
