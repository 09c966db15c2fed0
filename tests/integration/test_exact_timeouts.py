"""Handlers that take exactly their timeout: each attempt ends once, succeeded or timed out."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta

from helpers import wait_final

from conveyor import Client, Task, Worker


def test_handlers_taking_exactly_their_timeout(start_server) -> None:
    server = start_server()
    client = Client(server.address)
    lock = threading.Lock()
    state = {"running": 0, "peak": 0, "runs": 0}
    timeout = 0.25

    def enter():
        with lock:
            state["running"] += 1
            state["runs"] += 1
            state["peak"] = max(state["peak"], state["running"])

    def leave():
        with lock:
            state["running"] -= 1

    def sync_exact(ctx, payload):
        enter()
        try:
            time.sleep(timeout)
            return b"sync"
        finally:
            leave()

    async def async_exact(ctx, payload):
        enter()
        try:
            await asyncio.sleep(timeout)
            return b"async"
        finally:
            leave()

    worker = Worker(server.address, concurrency=1, lease_wait=1)
    worker.register_handler("sync_exact", sync_exact)
    worker.register_handler("async_exact", async_exact)
    worker.start()
    try:
        ids = []
        for _ in range(15):
            ids.extend(
                client.enqueue_task(
                    Task(type=kind, timeout=timedelta(seconds=timeout), max_retries=0)
                )
                for kind in ("sync_exact", "async_exact")
            )
        outcomes = []
        for task_id in ids:
            status = wait_final(client, task_id, timeout=60)
            outcomes.append(status.state)
            events = [e.event for e in client.get_task_status(task_id, history=True).history]
            assert events in (
                ["enqueued", "started", "succeeded"],
                ["enqueued", "started", "timed_out"],
            ), events
    finally:
        worker.stop()
        client.close()
    assert state["peak"] == 1
    assert state["runs"] == len(ids)
