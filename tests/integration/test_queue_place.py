"""A retry and a hand-back keep their place in the queue, and a retry waiting out its
backoff reads and cancels as a queued task (tests/e2e/test_fifo.py has no retries or
hand-backs)."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

from helpers import wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker


class TestRetryFifo:
    def test_a_due_retry_starts_before_younger_queued_tasks(self, start_server, client, db):
        """A retried task keeps its seq: once due it starts before younger queued tasks."""
        # The backoff must outlast the polls that see A scheduled and B running: with
        # 200 ms, a loaded CI machine once missed the window (A was due and ran again first).
        server = start_server(
            retry_backoff_base=timedelta(seconds=2),
            retry_backoff_cap=timedelta(seconds=2),
        )
        order: list[tuple[str, int]] = []
        gate = threading.Event()
        lock = threading.Lock()

        def handler(ctx, payload):
            with lock:
                order.append((payload.decode(), ctx.attempt))
            if payload == b"A" and ctx.attempt == 1:
                raise RuntimeError("first attempt fails")
            if payload == b"B":
                gate.wait(10)
            return b"ok"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("fifo.retry", handler)
        worker.start()
        try:
            a = client.enqueue_task(Task(type="fifo.retry", payload=b"A"))
            wait_for(lambda: db.task(a)["state"] == "scheduled", what="A to be scheduled")
            b = client.enqueue_task(Task(type="fifo.retry", payload=b"B"))
            wait_for(lambda: db.task(b)["state"] == "running", what="B to run")
            c = client.enqueue_task(Task(type="fifo.retry", payload=b"C"))
            wait_for(lambda: db.task(a)["state"] == "queued", what="A to be promoted")
            gate.set()
            for task_id in (a, b, c):
                assert wait_final(client, task_id).state is TaskState.SUCCEEDED
        finally:
            gate.set()
            worker.stop()
        assert order == [("A", 1), ("B", 1), ("A", 2), ("C", 1)]


class TestScheduledStatusAndCancel:
    def test_status_fields_while_a_retry_waits_and_after_its_cancel(self, start_server, db):
        server = start_server(
            retry_backoff_base=timedelta(seconds=30),
            retry_backoff_cap=timedelta(seconds=30),
        )
        ran = []

        def handler(ctx, payload):
            ran.append(ctx.attempt)
            raise ValueError("boom \u00e9")

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("sched.cancel", handler)
        worker.start()
        try:
            with Client(server.address) as client:
                task_id = client.enqueue_task(Task(type="sched.cancel", timeout=12.5))
                wait_for(lambda: db.task(task_id)["state"] == "scheduled", what="scheduled")
                status = client.get_task_status(task_id, history=True)
                assert status.state is TaskState.QUEUED
                assert status.attempts == 1
                assert status.max_retries == 3
                assert status.timeout == timedelta(seconds=12.5)
                assert status.started_at is not None
                assert status.finished_at is None
                assert status.last_error == "ValueError: boom \u00e9"
                assert status.result is None
                assert status.worker_id == worker.worker_id
                assert status.available_at is not None
                assert status.available_at > status.started_at + timedelta(seconds=10)
                assert [e.event for e in status.history] == ["enqueued", "started", "failed"]
                assert status.history[-1].state is TaskState.QUEUED
                assert status.history[-1].detail == "ValueError: boom \u00e9"

                cancelled = client.cancel_task(task_id)
                assert cancelled.state is TaskState.CANCELLED
                assert cancelled.finished_at is not None
                assert cancelled.attempts == 1
                after = client.get_task_status(task_id, history=True)
                assert after.history[-1].event == "cancelled"
                assert after.history[-1].detail == "cancelled while queued"
                # Cancelled again: no-op.
                assert client.cancel_task(task_id).state is TaskState.CANCELLED
        finally:
            worker.stop()
        assert ran == [1]


class TestReleasedKeepsPlace:
    def test_a_handed_back_task_starts_before_younger_ones(self, server, client, db):
        started = threading.Event()

        async def slow(ctx, payload):
            started.set()
            await asyncio.sleep(30)
            return b"never"

        first = Worker(server.address, concurrency=1, drain_timeout=0)
        first.register_handler("rel", slow)
        first.start()
        try:
            a = client.enqueue_task(Task(type="rel", payload=b"A"))
            wait_for(started.is_set, what="A to start")
            b = client.enqueue_task(Task(type="rel", payload=b"B"))
            c = client.enqueue_task(Task(type="rel", payload=b"C"))
        finally:
            first.stop()
        status = client.get_task_status(a, history=True)
        assert status.state is TaskState.QUEUED
        assert status.attempts == 0
        assert status.history[-1].event == "released"
        order = []

        def record(ctx, payload):
            order.append((payload, ctx.attempt))

        second = Worker(server.address, concurrency=1)
        second.register_handler("rel", record)
        second.start()
        try:
            for task_id in (a, b, c):
                assert wait_final(client, task_id).state is TaskState.SUCCEEDED
        finally:
            second.stop()
        assert order == [(b"A", 1), (b"B", 1), (b"C", 1)]
