"""Timeouts: an attempt that outlives its timeout is stopped, reported timed out, retried."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, timedelta

from helpers import RERUN_AFTER_LEASE_EXPIRED, wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker

SHORT = timedelta(milliseconds=300)
# The history of a task whose first attempt timed out and whose retry succeeded.
TIMED_OUT_THEN_SUCCEEDED = ["enqueued", "started", "timed_out", "started", "succeeded"]


class TestAsyncHandlerTimeout:
    def test_async_handler_past_its_timeout_is_cancelled_and_the_task_times_out(
        self, server, client: Client
    ) -> None:
        """An async handler sleeping past its timeout sees CancelledError; the task FAILS."""
        saw_cancelled = threading.Event()
        started = threading.Event()

        async def sleepy(ctx, payload):
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                saw_cancelled.set()
                raise
            return b"woke up"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("sleepy", sleepy)
        worker.start()
        try:
            began = time.monotonic()
            task_id = client.enqueue_task(Task(type="sleepy", timeout=SHORT, max_retries=0))
            status = wait_final(client, task_id, timeout=15)
            elapsed = time.monotonic() - began
            wait_for(saw_cancelled.is_set, timeout=5, what="the handler to see CancelledError")
        finally:
            worker.stop()

        assert started.is_set()
        assert elapsed < 10
        assert status.state is TaskState.FAILED
        assert status.attempts == 1
        assert status.last_error is not None
        assert status.last_error.startswith("TimeoutError"), status.last_error
        events = [e.event for e in status.history]
        assert events == ["enqueued", "started", "timed_out"]
        assert status.history[-1].state is TaskState.FAILED


class TestSyncHandlerTimeout:
    def test_sync_handler_ignoring_cancellation_times_out_while_its_thread_runs_on(
        self, server, client: Client
    ) -> None:
        """A sync handler sleeping past its timeout is reported timed out before it returns."""
        started = threading.Event()
        finished = threading.Event()

        def stubborn(ctx, payload):
            started.set()
            try:
                time.sleep(2)  # the work itself: it ignores ctx.cancelled on purpose
            finally:
                finished.set()
            return b"too late"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("stubborn", stubborn)
        worker.start()
        try:
            began = time.monotonic()
            task_id = client.enqueue_task(Task(type="stubborn", timeout=SHORT, max_retries=0))
            status = wait_final(client, task_id, timeout=15)
            elapsed = time.monotonic() - began
            # The outcome is already recorded while the thread is still sleeping.
            assert not finished.is_set()
            assert worker.busy_threads() == 1
            wait_for(finished.is_set, timeout=10, what="the handler thread to return")
            wait_for(lambda: worker.busy_threads() == 0, timeout=5, what="the thread to be freed")
            after = client.get_task_status(task_id, history=True)
        finally:
            worker.stop()

        assert started.is_set()
        assert elapsed < 10
        assert status.state is TaskState.FAILED
        assert status.last_error is not None
        assert status.last_error.startswith("TimeoutError"), status.last_error
        assert [e.event for e in status.history] == ["enqueued", "started", "timed_out"]
        # The handler's late return is not reported: the outcome stays the timeout.
        assert after.state is TaskState.FAILED
        assert [e.event for e in after.history] == ["enqueued", "started", "timed_out"]
        assert after.result is None

    def test_timed_out_sync_handler_keeps_its_slot_until_its_thread_returns(
        self, server, client: Client
    ) -> None:
        """With concurrency=1 the next task starts only after the timed-out thread returns."""
        lock = threading.Lock()
        timeline: list[tuple[str, str, float]] = []

        def handler(ctx, payload):
            with lock:
                timeline.append(("start", payload.decode(), time.monotonic()))
            if payload == b"slow":
                time.sleep(1.5)  # ignores ctx.cancelled on purpose
            with lock:
                timeline.append(("end", payload.decode(), time.monotonic()))
            return payload

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("slot", handler)
        worker.start()
        try:
            slow_id = client.enqueue_task(
                Task(type="slot", payload=b"slow", timeout=SHORT, max_retries=0)
            )
            slow = wait_final(client, slow_id, timeout=15)
            fast_id = client.enqueue_task(Task(type="slot", payload=b"fast"))
            fast = wait_final(client, fast_id, timeout=15)
        finally:
            worker.stop()

        assert slow.state is TaskState.FAILED
        assert fast.state is TaskState.SUCCEEDED
        with lock:
            events = {(kind, name): at for kind, name, at in timeline}
        assert events[("start", "fast")] >= events[("end", "slow")], timeline

    def test_sync_handler_sees_ctx_cancelled_set_at_its_timeout(
        self, server, client: Client
    ) -> None:
        """A sync handler waiting on ctx.cancelled sees it set when its timeout passes."""
        observed: dict[str, float | bool] = {}
        done = threading.Event()

        def patient(ctx, payload):
            began = time.monotonic()
            observed["was_set"] = ctx.cancelled.wait(20)
            observed["waited"] = time.monotonic() - began
            done.set()
            return b"stopped waiting"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("patient", patient)
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="patient", timeout=SHORT, max_retries=0))
            status = wait_final(client, task_id, timeout=15)
            wait_for(done.is_set, timeout=10, what="the handler to return")
        finally:
            worker.stop()

        assert observed["was_set"] is True
        assert 0.2 <= observed["waited"] < 5, observed
        assert status.state is TaskState.FAILED
        assert [e.event for e in status.history][-1] == "timed_out"


class TestTheSameTaskTwiceOnOneWorker:
    def test_a_retry_leased_beside_its_timed_out_thread_keeps_its_heartbeats(
        self, start_server
    ) -> None:
        """Attempt 1's sync handler ignores its timeout and runs on; the retry is leased to
        the same worker and starts beside it. When attempt 1's thread ends at last, attempt
        2 must stay heartbeated: the old attempt's bookkeeping used to remove the new one's
        entry (both by task id), its lease expired while it ran, and a third attempt ran."""
        lease = timedelta(seconds=1.5)
        server = start_server(lease_ttl=lease, heartbeat_interval=timedelta(milliseconds=300))
        first_may_end, second_started, second_may_end = (threading.Event() for _ in range(3))
        first_ended_at: list[float] = []
        attempts: list[int] = []

        def stubborn(ctx, _payload: bytes) -> bytes:
            attempts.append(ctx.attempt)
            if ctx.attempt == 1:
                assert first_may_end.wait(30), "the test never let attempt 1 end"
                first_ended_at.append(time.monotonic())
            elif ctx.attempt == 2:
                second_started.set()
                assert second_may_end.wait(30), "the test never let attempt 2 end"
            return f"attempt {ctx.attempt}".encode()

        worker = Worker(server.address, concurrency=2)
        worker.register_handler("stubborn", stubborn)
        worker.start()
        try:
            with Client(server.address) as client:
                task_id = client.enqueue_task(
                    Task(type="stubborn", timeout=timedelta(seconds=5), max_retries=3)
                )
                assert second_started.wait(20), "the retry did not start"
                first_may_end.set()
                wait_for(lambda: first_ended_at, what="attempt 1's thread to end")
                # Attempt 2 outlives two leases after attempt 1's bookkeeping ended (its own
                # timeout is 5 s): only heartbeats keep its lease.
                wait_for(
                    lambda: time.monotonic() - first_ended_at[0] > 2 * lease.total_seconds(),
                    what="two leases to pass",
                )
                second_may_end.set()
                status = wait_final(client, task_id)
        finally:
            first_may_end.set()
            second_may_end.set()
            worker.stop()

        assert status.state is TaskState.SUCCEEDED
        assert status.result == b"attempt 2"
        assert attempts == [1, 2]
        assert [e.event for e in status.history] == TIMED_OUT_THEN_SUCCEEDED

    def test_an_attempt_whose_task_comes_back_to_its_worker_is_stopped(
        self, start_server, db
    ) -> None:
        """The server reaps a lease (a heartbeat came too late) and the same worker leases
        the task again before any heartbeat tells it the first lease is gone. The first
        attempt must stop then: it used to run on beside the second (the same task twice at
        once on one worker) until its own timeout, since the new attempt had replaced it."""
        server = start_server(
            lease_ttl=timedelta(seconds=60), heartbeat_interval=timedelta(seconds=30)
        )
        first_cancelled, second_started = threading.Event(), threading.Event()

        async def long_job(ctx, _payload: bytes) -> bytes:
            if ctx.attempt == 1:
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    first_cancelled.set()
                    raise
            second_started.set()
            return f"attempt {ctx.attempt}".encode()

        worker = Worker(server.address, concurrency=2)
        worker.register_handler("long", long_job)
        worker.start()
        try:
            with Client(server.address) as client:
                task_id = client.enqueue_task(Task(type="long", timeout=timedelta(minutes=2)))
                wait_for(lambda: db.task(task_id)["state"] == "running", what="attempt 1")
                db.execute(
                    "UPDATE conveyor_tasks SET lease_expires_at = now() - interval '1 second' "
                    "WHERE id = $1::uuid",
                    task_id,
                )  # as a lease whose heartbeat came too late; the reaper takes it back
                assert second_started.wait(10), "the task did not come back to the worker"
                # At once, not at the next heartbeat (30 s away).
                assert first_cancelled.wait(5), "attempt 1 ran on beside attempt 2"
                status = wait_final(client, task_id)
        finally:
            worker.stop()

        assert status.state is TaskState.SUCCEEDED
        assert status.result == b"attempt 2"
        assert [e.event for e in status.history] == RERUN_AFTER_LEASE_EXPIRED


class TestTimeoutRetry:
    def test_timed_out_attempt_is_retried_when_retries_remain(self, server, client: Client) -> None:
        """A timed-out first attempt is retried; a quick second attempt succeeds."""
        lock = threading.Lock()
        attempts: list[int] = []

        async def slow_then_fast(ctx, payload):
            with lock:
                attempts.append(ctx.attempt)
            if ctx.attempt == 1:
                await asyncio.sleep(30)
            return b"second time lucky"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("slow-then-fast", slow_then_fast)
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="slow-then-fast", timeout=SHORT, max_retries=1))
            status = wait_final(client, task_id, timeout=15)
        finally:
            worker.stop()

        assert status.state is TaskState.SUCCEEDED
        assert status.attempts == 2
        assert status.result == b"second time lucky"
        with lock:
            assert attempts == [1, 2]
        assert [e.event for e in status.history] == TIMED_OUT_THEN_SUCCEEDED
        timed_out = status.history[2]
        assert timed_out.attempt == 1
        assert timed_out.state is TaskState.QUEUED
        assert timed_out.detail is not None
        assert timed_out.detail.startswith("TimeoutError")


class TestDeadline:
    def test_ctx_deadline_is_the_start_time_plus_the_timeout(self, server, client: Client) -> None:
        """ctx.deadline is an aware UTC datetime about started_at + timeout."""
        seen = {}

        def record(ctx, payload):
            seen["deadline"] = ctx.deadline
            seen["time_left"] = ctx.time_left()

        timeout = timedelta(seconds=90)
        worker = Worker(server.address, concurrency=1)
        worker.register_handler("deadline", record)
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="deadline", timeout=timeout))
            status = wait_final(client, task_id)
        finally:
            worker.stop()

        assert status.state is TaskState.SUCCEEDED
        deadline = seen["deadline"]
        assert deadline.tzinfo is not None
        assert deadline.utcoffset() == timedelta(0)
        assert status.started_at is not None
        expected = status.started_at.astimezone(UTC) + timeout
        assert abs((deadline - expected).total_seconds()) < 2, (deadline, expected)
        assert timedelta(seconds=80) < seen["time_left"] <= timeout
