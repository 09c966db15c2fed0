"""Retries: failed attempts are retried with backoff until max_retries, then the task fails."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

from helpers import wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker
from conveyor.errors import PermanentFailure


class Invocations:
    """A thread-safe record of the attempts a handler really ran."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempts: list[tuple[str, int]] = []

    def add(self, task_id: str, attempt: int) -> None:
        with self._lock:
            self._attempts.append((task_id, attempt))

    def attempts(self, task_id: str) -> list[int]:
        with self._lock:
            return [attempt for tid, attempt in self._attempts if tid == task_id]


def run_one(server, client: Client, task: Task, handler, *, timeout: float = 30):
    """Run `task` on a worker with `handler` registered for its type; return its final status."""
    worker = Worker(server.address, concurrency=1)
    worker.register_handler(task.type, handler)
    worker.start()
    try:
        task_id = client.enqueue_task(task)
        return wait_final(client, task_id, timeout=timeout)
    finally:
        worker.stop()


class TestFailThenSucceed:
    def test_task_failing_twice_then_succeeding_ends_succeeded_after_three_attempts(
        self, server, client: Client
    ) -> None:
        """A handler that fails on attempts 1 and 2 and succeeds on 3 ends SUCCEEDED."""
        calls = Invocations()

        def flaky(ctx, payload):
            calls.add(ctx.task_id, ctx.attempt)
            if ctx.attempt < 3:
                raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
            return b"finally"

        status = run_one(server, client, Task(type="flaky", max_retries=3), flaky)

        assert status.state is TaskState.SUCCEEDED
        assert status.attempts == 3
        assert status.result == b"finally"
        assert status.last_error is None
        assert calls.attempts(status.id) == [1, 2, 3]
        outcomes = [e for e in status.history if e.event in ("failed", "succeeded")]
        assert [e.event for e in outcomes] == ["failed", "failed", "succeeded"]
        assert [e.attempt for e in outcomes] == [1, 2, 3]
        assert outcomes[0].detail == "RuntimeError: flaky failure on attempt 1"
        assert outcomes[1].detail == "RuntimeError: flaky failure on attempt 2"
        # A retried failure puts the task back in the queue, not in a final state.
        assert [e.state for e in outcomes] == [
            TaskState.QUEUED,
            TaskState.QUEUED,
            TaskState.SUCCEEDED,
        ]
        assert [e.event for e in status.history].count("started") == 3


class TestRetriesExhausted:
    def test_always_failing_task_fails_after_one_plus_max_retries_attempts(
        self, server, client: Client
    ) -> None:
        """An always-raising handler with max_retries=2 runs exactly 3 times, then FAILED."""
        calls = Invocations()

        def broken(ctx, payload):
            calls.add(ctx.task_id, ctx.attempt)
            raise ValueError("bad input 42")

        status = run_one(server, client, Task(type="broken", max_retries=2), broken)

        assert status.state is TaskState.FAILED
        assert status.attempts == 3
        assert status.last_error == "ValueError: bad input 42"
        assert status.result is None
        assert status.finished_at is not None
        assert calls.attempts(status.id) == [1, 2, 3]
        failures = [e for e in status.history if e.event == "failed"]
        assert [e.attempt for e in failures] == [1, 2, 3]
        assert [e.state for e in failures] == [TaskState.QUEUED, TaskState.QUEUED, TaskState.FAILED]
        assert all(e.detail == "ValueError: bad input 42" for e in failures)


class TestNoRetries:
    def test_max_retries_zero_runs_exactly_once(self, server, client: Client) -> None:
        """With max_retries=0 a failing task is attempted exactly once."""
        calls = Invocations()

        def broken(ctx, payload):
            calls.add(ctx.task_id, ctx.attempt)
            raise RuntimeError("once is enough")

        status = run_one(server, client, Task(type="once", max_retries=0), broken)

        assert status.state is TaskState.FAILED
        assert status.attempts == 1
        assert status.last_error == "RuntimeError: once is enough"
        assert calls.attempts(status.id) == [1]
        assert [e.event for e in status.history] == ["enqueued", "started", "failed"]


class TestHandlerRaisingCancelledError:
    def test_async_handler_raising_cancelled_error_itself_spends_its_attempts(
        self, server, client: Client
    ) -> None:
        """A CancelledError the worker did not cause is a failed attempt, retried as usual."""
        calls = Invocations()

        async def gives_up(ctx, payload):
            calls.add(ctx.task_id, ctx.attempt)
            # E.g. awaiting a shared task that something else cancelled.
            raise asyncio.CancelledError

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("gives-up", gives_up)
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="gives-up", max_retries=1))
            wait_for(
                lambda: (
                    len(calls.attempts(task_id)) > 2
                    or client.get_task_status(task_id).state.is_final
                ),
                timeout=15,
                what="the task to finish or run more often than 1 + max_retries",
            )
            status = client.get_task_status(task_id, history=True)
        finally:
            worker.stop()

        assert calls.attempts(task_id)[:5] == [1, 2], "the handler ran more than 2 times"
        assert status.state is TaskState.FAILED
        assert status.attempts == 2
        assert status.last_error is not None
        assert "CancelledError" in status.last_error
        assert "released" not in [e.event for e in status.history]


class TestPermanentFailure:
    def test_permanent_failure_fails_at_once_despite_remaining_retries(
        self, server, client: Client
    ) -> None:
        """Raising PermanentFailure fails the task on attempt 1 although retries remain."""
        calls = Invocations()

        def hopeless(ctx, payload):
            calls.add(ctx.task_id, ctx.attempt)
            raise PermanentFailure("no")

        status = run_one(server, client, Task(type="hopeless", max_retries=5), hopeless)

        assert status.state is TaskState.FAILED
        assert status.attempts == 1
        assert status.max_retries == 5
        assert status.last_error == "PermanentFailure: no"
        assert calls.attempts(status.id) == [1]
        assert [e.event for e in status.history] == ["enqueued", "started", "failed"]


class TestBackoff:
    def test_retries_wait_an_exponentially_growing_jittered_backoff(self, start_server) -> None:
        """The gap before retry n is >= 50 % of base * 2**(n-1), and the gaps grow."""
        base = 0.2
        # A short poll interval, so the gaps measure the backoff and not the long poll's
        # fallback polling (a retry becoming available sends no notification).
        server = start_server(
            retry_backoff_base=timedelta(milliseconds=200),
            retry_backoff_cap=timedelta(seconds=2),
            poll_interval=timedelta(milliseconds=20),
        )

        def broken(ctx, payload):
            raise RuntimeError("still broken")

        with Client(server.address) as client:
            status = run_one(server, client, Task(type="backoff", max_retries=3), broken)

        assert status.state is TaskState.FAILED
        assert status.attempts == 4
        history = list(status.history)
        gaps = []
        for index, event in enumerate(history):
            if event.event == "failed" and event.state is TaskState.QUEUED:
                following = next(e for e in history[index + 1 :] if e.event == "started")
                assert following.attempt == event.attempt + 1
                gaps.append((following.at - event.at).total_seconds())
        assert len(gaps) == 3, history
        for n, gap in enumerate(gaps, start=1):
            nominal = base * 2 ** (n - 1)
            assert gap >= 0.5 * nominal, f"gap {n} was {gap:.3f}s; nominal {nominal}s: {gaps}"
        assert gaps[2] > gaps[0], gaps


class TestHandlerReturnValues:
    def test_returning_str_fails_the_attempt_with_a_type_error(
        self, server, client: Client
    ) -> None:
        """A handler returning str instead of bytes fails the attempt with a TypeError."""
        status = run_one(
            server, client, Task(type="stringy", max_retries=0), lambda _ctx, _payload: "text"
        )

        assert status.state is TaskState.FAILED
        assert status.attempts == 1
        assert status.last_error is not None
        assert status.last_error.startswith("TypeError")
        assert "str" in status.last_error
        assert status.result is None

    def test_returning_none_succeeds_with_no_result(self, server, client: Client) -> None:
        """A handler returning None succeeds and the task's result is None."""
        status = run_one(server, client, Task(type="nothing"), lambda _ctx, _payload: None)

        assert status.state is TaskState.SUCCEEDED
        assert status.attempts == 1
        assert status.result is None

    def test_returning_empty_bytes_is_distinct_from_none(self, server, client: Client) -> None:
        """A handler returning b"" succeeds with an empty result, not None."""
        status = run_one(server, client, Task(type="empty"), lambda _ctx, _payload: b"")

        assert status.state is TaskState.SUCCEEDED
        assert status.result == b""

    def test_returning_a_result_over_the_size_limit_fails_the_attempt_promptly(
        self, start_server
    ) -> None:
        """A result larger than the server accepts fails the attempt at once, saying why."""
        server = start_server(max_payload_bytes=1000)
        with Client(server.address) as client:
            status = run_one(
                server,
                client,
                Task(type="huge", max_retries=0),
                lambda _ctx, _payload: b"x" * 5000,
                timeout=10,
            )
        # The default lease is 30 s: a task left to its lease expiry would not finish in time.

        assert status.state is TaskState.FAILED
        assert status.attempts == 1
        assert status.last_error is not None
        assert not status.last_error.startswith("LeaseExpired"), status.last_error
        assert "limit" in status.last_error, status.last_error
        assert status.result is None

    def test_returning_bytearray_succeeds_with_its_bytes(self, server, client: Client) -> None:
        """A handler returning a bytearray succeeds with those bytes as the result."""
        status = run_one(
            server,
            client,
            Task(type="buffer", payload=b"xyz"),
            lambda _ctx, payload: bytearray(payload) + bytearray(b"!"),
        )

        assert status.state is TaskState.SUCCEEDED
        assert status.result == b"xyz!"
        assert isinstance(status.result, bytes)


class TestScheduledRetries:
    """A retry waits out its backoff as `scheduled`, out of the queue the claim reads
    (migration 0015), and joins the queue when the backoff ends."""

    def test_the_retry_is_scheduled_in_between_and_publicly_queued(
        self, start_server, client: Client, db
    ) -> None:
        """Between the attempts the task is stored `scheduled` (the claim's range holds
        only available tasks) and reads as QUEUED; the server's own timer promotes it (a
        reaper round a minute long leaves it nothing to do)."""
        server = start_server(
            retry_backoff_base=timedelta(seconds=2),
            retry_backoff_cap=timedelta(seconds=2),
            reaper_interval=timedelta(minutes=1),
        )

        def fails_once(ctx, _payload):
            if ctx.attempt == 1:
                raise RuntimeError("first attempt fails")
            return b"second"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("scheduled.retry", fails_once)
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="scheduled.retry"))
            wait_for(
                lambda: db.task(task_id)["state"] == "scheduled",
                what="the failed attempt's retry to be scheduled",
            )
            assert client.get_task_status(task_id).state is TaskState.QUEUED
            status = wait_final(client, task_id)
        finally:
            worker.stop()
        assert (status.state, status.attempts, status.result) == (TaskState.SUCCEEDED, 2, b"second")

    def test_the_leader_promotes_a_retry_whose_timer_was_lost(
        self, start_server, client: Client, db
    ) -> None:
        """The server that scheduled a retry promotes it when its backoff ends; one that
        died took that timer with it. The leader's reaper round promotes what is due."""
        server = start_server(reaper_interval=timedelta(milliseconds=100))
        task_id = client.enqueue_task(Task(type="scheduled.lost"))
        # As a failure report leaves it, on a server that then died before its timer fired.
        db.execute(
            "UPDATE conveyor_tasks SET state = 'scheduled', attempt = 1, "
            "available_at = now() - interval '1 second' WHERE id = $1::uuid",
            task_id,
        )
        worker = Worker(server.address, concurrency=1)
        worker.register_handler("scheduled.lost", lambda _ctx, _payload: b"ran")
        worker.start()
        try:
            status = wait_final(client, task_id, timeout=15)
        finally:
            worker.stop()
        assert (status.state, status.result) == (TaskState.SUCCEEDED, b"ran")
