"""Cancellation: queued tasks never run, running ones are stopped, final ones are refused."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import timedelta

import pytest
from helpers import wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker
from conveyor.errors import TaskAlreadyFinished, TaskNotFound

# Workers learn of a cancellation from their next heartbeat: make heartbeats quick.
QUICK_HEARTBEATS = {
    "heartbeat_interval": timedelta(milliseconds=200),
    "lease_ttl": timedelta(seconds=5),
}


def stale_reports(server) -> float:
    """How many reports and heartbeats the server refused for a lease that was not current."""
    value = server.server.metrics.registry.get_sample_value(
        "conveyor_stale_completions_rejected_total"
    )
    assert value is not None, "the server exports no stale-completions counter"
    return value


class TestCancelQueued:
    def test_cancelled_queued_task_never_runs(self, server, client: Client, db) -> None:
        """A task cancelled while queued is CANCELLED and no worker ever runs it."""
        task_id = client.enqueue_task(Task(type="job"))
        cancelled = client.cancel_task(task_id)
        assert cancelled.state is TaskState.CANCELLED
        assert cancelled.finished_at is not None

        lock = threading.Lock()
        ran: list[str] = []

        def record(ctx, payload):
            with lock:
                ran.append(ctx.task_id)
            return b"ran"

        worker = Worker(server.address, concurrency=2)
        worker.register_handler("job", record)
        worker.start()
        try:
            second_id = client.enqueue_task(Task(type="job"))
            second = wait_final(client, second_id)
        finally:
            worker.stop()

        assert second.state is TaskState.SUCCEEDED
        with lock:
            assert ran == [second_id]
        status = client.get_task_status(task_id, history=True)
        assert status.state is TaskState.CANCELLED
        assert status.attempts == 0
        assert [e.event for e in status.history] == ["enqueued", "cancelled"]
        assert [row["event"] for row in db.events(task_id)] == ["enqueued", "cancelled"]
        assert "started" not in [row["event"] for row in db.events(task_id)]


class TestCancelRunningAsync:
    def test_running_async_handler_is_cancelled_and_frees_its_slot(self, start_server) -> None:
        """Cancelling a running async task cancels its handler and frees the worker's slot."""
        server = start_server(**QUICK_HEARTBEATS)
        started = threading.Event()
        saw_cancelled_error = threading.Event()
        cancelled_flag_set = threading.Event()

        async def handler(ctx, payload):
            if payload == b"fast":
                return b"fast done"
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                saw_cancelled_error.set()
                if ctx.cancelled.is_set():
                    cancelled_flag_set.set()
                raise
            return b"slept"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("long", handler)
        worker.start()
        try:
            with Client(server.address) as client:
                task_id = client.enqueue_task(Task(type="long", payload=b"slow"))
                wait_for(started.is_set, timeout=10, what="the handler to start")
                returned = client.cancel_task(task_id)
                assert returned.state is TaskState.CANCELLED
                assert client.get_task_status(task_id).state is TaskState.CANCELLED

                wait_for(saw_cancelled_error.is_set, timeout=10, what="CancelledError")
                # concurrency=1: a next task can only run once the cancelled one's slot is free.
                next_id = client.enqueue_task(Task(type="long", payload=b"fast"))
                following = wait_final(client, next_id, timeout=15)
                status = client.get_task_status(task_id, history=True)
        finally:
            worker.stop()

        assert cancelled_flag_set.is_set()
        assert following.state is TaskState.SUCCEEDED
        assert following.result == b"fast done"
        assert status.state is TaskState.CANCELLED
        assert status.result is None
        assert [e.event for e in status.history] == ["enqueued", "started", "cancelled"]
        assert stale_reports(server) == 0


class TestCancelRunningSync:
    def test_running_sync_handler_sees_ctx_cancelled_within_seconds(self, start_server) -> None:
        """A sync handler polling ctx.cancelled sees it set soon after the task is cancelled."""
        server = start_server(**QUICK_HEARTBEATS)
        started = threading.Event()
        finished = threading.Event()
        seen: dict[str, float | bool] = {}

        def poller(ctx, payload):
            started.set()
            give_up = time.monotonic() + 20
            while time.monotonic() < give_up:
                if ctx.cancelled.wait(0.05):
                    seen["at"] = time.monotonic()
                    seen["cancelled"] = True
                    break
            finished.set()
            return b"stopped"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("poll", poller)
        worker.start()
        try:
            with Client(server.address) as client:
                task_id = client.enqueue_task(Task(type="poll"))
                wait_for(started.is_set, timeout=10, what="the handler to start")
                client.cancel_task(task_id)
                cancelled_at = time.monotonic()
                wait_for(finished.is_set, timeout=25, what="the handler to return")
        finally:
            worker.stop()

        assert seen.get("cancelled") is True, "the handler never saw ctx.cancelled"
        assert seen["at"] - cancelled_at < 5


class TestCancelledTaskIsNotReported:
    def test_handler_returning_normally_after_cancel_is_not_reported(
        self, start_server, db
    ) -> None:
        """After a cancel, a handler that returns normally does not make the task succeed."""
        server = start_server(**QUICK_HEARTBEATS)
        started = threading.Event()
        returned = threading.Event()

        def polite(ctx, payload):
            if payload == b"fast":
                return b"fast done"
            started.set()
            saw = ctx.cancelled.wait(20)
            returned.set()
            return b"finished anyway" if saw else b"never cancelled"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("polite", polite)
        worker.start()
        try:
            with Client(server.address) as client:
                task_id = client.enqueue_task(Task(type="polite", payload=b"slow"))
                wait_for(started.is_set, timeout=10, what="the handler to start")
                client.cancel_task(task_id)
                wait_for(returned.is_set, timeout=10, what="the handler to return")
                # The slot frees only after the attempt is settled; a next task proves it.
                next_id = client.enqueue_task(Task(type="polite", payload=b"fast"))
                following = wait_final(client, next_id, timeout=15)
                status = client.get_task_status(task_id, history=True)
        finally:
            worker.stop()

        assert following.state is TaskState.SUCCEEDED
        assert status.state is TaskState.CANCELLED
        assert status.result is None
        events = [e.event for e in status.history]
        assert events == ["enqueued", "started", "cancelled"]
        assert "succeeded" not in [row["event"] for row in db.events(task_id)]
        # The worker did not even try: the server refused no report for the revoked lease.
        assert stale_reports(server) == 0


class TestCancelFinished:
    def test_cancelling_a_succeeded_task_raises_task_already_finished(
        self, server, client: Client
    ) -> None:
        """Cancelling a SUCCEEDED task raises TaskAlreadyFinished and changes nothing."""
        worker = Worker(server.address, concurrency=1)
        worker.register_handler("ok", lambda _ctx, _payload: b"done")
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="ok"))
            assert wait_final(client, task_id).state is TaskState.SUCCEEDED
        finally:
            worker.stop()

        with pytest.raises(TaskAlreadyFinished):
            client.cancel_task(task_id)
        status = client.get_task_status(task_id, history=True)
        assert status.state is TaskState.SUCCEEDED
        assert status.result == b"done"
        assert "cancelled" not in [e.event for e in status.history]

    def test_cancelling_a_failed_task_raises_task_already_finished(
        self, server, client: Client
    ) -> None:
        """Cancelling a FAILED task raises TaskAlreadyFinished and changes nothing."""

        def broken(ctx, payload):
            raise RuntimeError("broken")

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("bad", broken)
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="bad", max_retries=0))
            assert wait_final(client, task_id).state is TaskState.FAILED
        finally:
            worker.stop()

        with pytest.raises(TaskAlreadyFinished):
            client.cancel_task(task_id)
        status = client.get_task_status(task_id, history=True)
        assert status.state is TaskState.FAILED
        assert "cancelled" not in [e.event for e in status.history]


class TestCancelIdempotent:
    def test_cancelling_a_cancelled_task_again_is_a_no_op(self, client: Client) -> None:
        """A second cancel returns CANCELLED without error and records no second event."""
        task_id = client.enqueue_task(Task(type="twice"))
        first = client.cancel_task(task_id)
        second = client.cancel_task(task_id)

        assert first.state is TaskState.CANCELLED
        assert second.state is TaskState.CANCELLED
        assert second.finished_at == first.finished_at
        history = client.get_task_status(task_id, history=True).history
        assert [e.event for e in history] == ["enqueued", "cancelled"]


class TestCancelUnknown:
    def test_cancelling_an_unknown_task_raises_task_not_found(self, client: Client) -> None:
        """Cancelling an id no task has raises TaskNotFound."""
        with pytest.raises(TaskNotFound):
            client.cancel_task(str(uuid.uuid4()))
