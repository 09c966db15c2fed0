"""A worker outlives whatever its handlers do, and every attempt ends in a report that says why.

A handler may exit the interpreter, be called with the wrong signature, raise an exception
that cannot be printed, return a buffer that cannot be read, swallow its cancellation or
stop its own worker. None of it may kill the worker or leave an attempt to a silent lease
expiry that blames a healthy worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from datetime import timedelta

import pytest
from helpers import running, wait_final, wait_for

from conveyor import AesGcmCodec, Client, Task, TaskState, Worker
from conveyor.client import tracing


def events(db, task_id: str) -> list[str]:
    return [e["event"] for e in db.events(task_id)]


class TestExitingHandlers:
    @pytest.mark.parametrize(
        ("exit_with", "error"),
        [(SystemExit(2), "SystemExit: 2"), (KeyboardInterrupt(), "KeyboardInterrupt")],
        ids=["SystemExit", "KeyboardInterrupt"],
    )
    def test_an_async_handler_exiting_fails_its_attempt_and_the_worker_runs_on(
        self, server, client: Client, db, exit_with: BaseException, error: str
    ) -> None:
        """argparse on a bad payload calls sys.exit inside an async handler: that attempt
        fails, as in a sync handler, while the attempt beside it finishes on the same worker
        (the exit once ended the worker's event loop, and every lease with it)."""
        long_started = threading.Event()
        release_long = threading.Event()
        worker = Worker(server.address, concurrency=2)

        @worker.handler("long")
        async def long(_ctx, _payload):
            long_started.set()
            await asyncio.to_thread(release_long.wait, 15)
            return b"long done"

        @worker.handler("exits")
        async def exits(_ctx, _payload):
            raise exit_with

        with running(worker):
            long_id = client.enqueue_task(Task(type="long", max_retries=0))
            wait_for(long_started.is_set, what="the long handler to start")
            exit_id = client.enqueue_task(Task(type="exits", max_retries=0))
            exited = wait_final(client, exit_id, timeout=15)
            assert worker.running
            release_long.set()
            finished = wait_final(client, long_id, timeout=15)

        assert exited.state is TaskState.FAILED
        assert exited.last_error == error
        assert events(db, exit_id) == ["enqueued", "started", "failed"]
        assert finished.state is TaskState.SUCCEEDED
        assert finished.result == b"long done"
        assert (
            db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker.worker_id)
            == "stopped"
        )

    def test_a_sync_handler_exiting_fails_its_attempt(self, server, client: Client) -> None:
        worker = Worker(server.address, concurrency=1)

        @worker.handler("exits")
        def exits(_ctx, _payload):
            sys.exit(3)

        with running(worker):
            status = wait_final(client, client.enqueue_task(Task(type="exits", max_retries=0)))
            assert worker.running
        assert status.state is TaskState.FAILED
        assert status.last_error == "SystemExit: 3"


WORKING_CODEC = AesGcmCodec([("k1", AesGcmCodec.new_key())])


class Unprintable(Exception):
    def __str__(self) -> str:
        return self.detail  # type: ignore[attr-defined]  # never set: AttributeError


class FailingCodec:
    """A custom PayloadCodec whose key service is down for opening, or for sealing."""

    def __init__(self, *, opens: bool, seals: bool) -> None:
        self.opens, self.seals = opens, seals

    def seal(self, data: bytes, *, field: str, task_id: str) -> bytes:
        if not self.seals:
            raise RuntimeError("key service unreachable (seal)")
        return WORKING_CODEC.seal(data, field=field, task_id=task_id)

    def open(self, data: bytes, *, field: str, task_id: str) -> bytes:
        if not self.opens:
            raise RuntimeError("key service unreachable (open)")
        return WORKING_CODEC.open(data, field=field, task_id=task_id)


def released_view(_ctx, _payload) -> memoryview:
    view = memoryview(b"result")
    view.release()
    return view


class TestErrorsAroundTheHandler:
    """Each of these once left the attempt unreported: it sat `running` for a whole lease
    and was then recorded as `LeaseExpired: worker W stopped renewing its lease`."""

    def test_an_async_handler_with_the_wrong_signature_fails_like_a_sync_one(
        self, server, client: Client
    ) -> None:
        worker = Worker(server.address, concurrency=2)

        @worker.handler("async.arity")
        async def async_arity(payload):  # ctx forgotten
            return payload

        @worker.handler("sync.arity")
        def sync_arity(payload):
            return payload

        with running(worker):
            async_id = client.enqueue_task(Task(type="async.arity", max_retries=0))
            sync_id = client.enqueue_task(Task(type="sync.arity", max_retries=0))
            async_status = wait_final(client, async_id, timeout=15)
            sync_status = wait_final(client, sync_id, timeout=15)
        assert sync_status.state is TaskState.FAILED
        assert async_status.state is TaskState.FAILED
        assert async_status.last_error == (
            "TypeError: TestErrorsAroundTheHandler.test_an_async_handler_with_the_wrong_"
            "signature_fails_like_a_sync_one.<locals>.async_arity() takes 1 positional "
            "argument but 2 were given"
        )
        assert async_status.attempts == 1

    @pytest.mark.parametrize("kind", ["sync", "async"])
    def test_an_exception_whose_message_cannot_be_read_is_reported(
        self, server, client: Client, kind: str
    ) -> None:
        worker = Worker(server.address, concurrency=1)

        def raise_it(_ctx, _payload):
            raise Unprintable

        async def raise_it_async(_ctx, _payload):
            raise Unprintable

        worker.register_handler("unprintable", raise_it if kind == "sync" else raise_it_async)
        with running(worker):
            status = wait_final(
                client, client.enqueue_task(Task(type="unprintable", max_retries=0)), timeout=15
            )
        assert status.state is TaskState.FAILED
        assert status.last_error == ("Unprintable (its message could not be read: AttributeError)")

    def test_a_result_that_cannot_be_read_fails_the_attempt(self, server, client: Client) -> None:
        worker = Worker(server.address, concurrency=1)
        worker.register_handler("released", released_view)
        with running(worker):
            status = wait_final(
                client, client.enqueue_task(Task(type="released", max_retries=0)), timeout=15
            )
        assert status.state is TaskState.FAILED
        assert status.last_error == "ValueError: operation forbidden on released memoryview object"

    def test_a_sync_wrapper_around_an_async_handler_is_told_how_to_fix_it(
        self, server, client: Client, recwarn: pytest.WarningsRecorder
    ) -> None:
        """A plain-def decorator around an async handler returns its coroutine: the attempt
        said only "handler returned coroutine; return bytes or None", beside Python's
        "coroutine ... was never awaited" warning."""

        def logged(fn):
            def wrapper(ctx, payload):  # a plain def: calling fn only makes a coroutine
                return fn(ctx, payload)

            return wrapper

        async def send(_ctx, _payload):
            return b"sent"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("wrapped", logged(send))
        with running(worker):
            status = wait_final(
                client, client.enqueue_task(Task(type="wrapped", max_retries=0)), timeout=15
            )
        assert status.state is TaskState.FAILED
        assert status.last_error is not None
        assert status.last_error.startswith("TypeError: handler returned a coroutine, never")
        assert "must be async def and await it" in status.last_error
        assert not [w for w in recwarn if "never awaited" in str(w.message)]

    def test_a_codec_that_cannot_open_fails_the_attempt(self, server, client: Client) -> None:
        ran: list[bytes] = []
        worker = Worker(server.address, concurrency=1, codec=FailingCodec(opens=False, seals=True))
        worker.register_handler("job", lambda _ctx, payload: ran.append(payload))
        # The error is sealed, as any handler's would be: read it back through the codec.
        reader = Client(server.address, codec=WORKING_CODEC)
        with running(worker), reader:
            status = wait_final(
                reader, client.enqueue_task(Task(type="job", max_retries=0)), timeout=15
            )
        assert status.state is TaskState.FAILED
        assert status.last_error == "RuntimeError: key service unreachable (open)"
        assert ran == []

    def test_a_codec_that_cannot_seal_fails_the_attempt_saying_so_in_the_clear(
        self, server, client: Client
    ) -> None:
        """The result and the error cannot be sealed: the report carries the codec's own
        error unsealed, never the message it was to seal."""
        worker = Worker(server.address, concurrency=1, codec=FailingCodec(opens=True, seals=False))

        @worker.handler("job")
        def job(_ctx, _payload):
            raise ValueError("card 4111 declined")

        worker.register_handler("ok", lambda _ctx, _payload: b"secret result")
        with running(worker):
            failed = wait_final(
                client, client.enqueue_task(Task(type="job", max_retries=0)), timeout=15
            )
            succeeded = wait_final(
                client, client.enqueue_task(Task(type="ok", max_retries=0)), timeout=15
            )
        expected = (
            "the worker could not seal the outcome: RuntimeError: key service unreachable (seal)"
        )
        assert (failed.state, failed.last_error) == (TaskState.FAILED, expected)
        assert (succeeded.state, succeeded.last_error) == (TaskState.FAILED, expected)
        assert succeeded.result is None


def handler_runs(worker: Worker, task_type: str, outcome: str) -> float:
    """How many runs of `task_type` the worker counted with `outcome`."""
    value = worker.metrics.registry.get_sample_value(
        "conveyor_worker_handler_duration_seconds_count", {"type": task_type, "outcome": outcome}
    )
    return value or 0.0


class TestAsyncHandlersIgnoringCancellation:
    def test_one_running_at_stop_is_handed_back_and_the_worker_thread_ends(
        self, server, client: Client, db, caplog
    ) -> None:
        """It once held its task unreleased until the lease expired (spending an attempt),
        and kept the worker's thread, loop and metrics endpoint alive for ever."""
        started = threading.Event()
        worker = Worker(server.address, concurrency=1, drain_timeout=0.5)

        @worker.handler("stubborn")
        async def stubborn(_ctx, _payload):
            started.set()
            while True:
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    continue

        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="stubborn", max_retries=0, timeout=300))
            wait_for(started.is_set, what="the handler to start")
        finally:
            worker.stop(timeout=30)
        assert not worker.running
        row = db.task(task_id)
        assert (row["state"], row["attempt"], row["lease_expires_at"]) == ("queued", 0, None)
        assert events(db, task_id) == ["enqueued", "started", "released"]
        assert (
            db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker.worker_id)
            == "stopped"
        )
        logged = {getattr(record, "event", None) for record in caplog.records}
        assert {"handler_ignores_cancellation", "loop_closed_with_tasks"} <= logged

    def test_one_cancelled_sends_no_timeout_report(self, start_server) -> None:
        """Cancelled, then past its timeout while it swallows the cancellation: the worker
        once reported it TIMED_OUT (refused by fencing) and logged a spurious timeout."""
        server = start_server(heartbeat_interval=timedelta(milliseconds=300))
        started = threading.Event()
        release = threading.Event()
        worker = Worker(server.address, concurrency=1)

        @worker.handler("swallows")
        async def swallows(_ctx, _payload):
            started.set()
            while not release.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.05)
            return b"late"

        with running(worker), Client(server.address) as client:
            task_id = client.enqueue_task(Task(type="swallows", timeout=1))
            wait_for(started.is_set, what="the handler to start")
            client.cancel_task(task_id)
            # One run is counted per attempt, with the outcome the worker settled it with.
            wait_for(
                lambda: (
                    handler_runs(worker, "swallows", "cancelled")
                    + handler_runs(worker, "swallows", "timed_out")
                ),
                what="the attempt to be settled",
            )
            release.set()
            rejected = worker.metrics.registry.get_sample_value(
                "conveyor_worker_reports_rejected_total"
            )
            assert handler_runs(worker, "swallows", "timed_out") == 0
            assert handler_runs(worker, "swallows", "cancelled") == 1
            assert not rejected
            assert client.get_task_status(task_id).state is TaskState.CANCELLED


class TestSyncHandlersIgnoringCancellation:
    def test_busy_threads_fall_when_they_return_after_the_worker_stopped(
        self, server, client: Client
    ) -> None:
        """The count was decremented on the worker's loop, so a thread that returned after
        the loop closed left busy_threads() and the gauge stuck: code polling
        busy_threads() after stop() to wait for stragglers waited for ever."""
        started = threading.Event()
        release = threading.Event()
        worker = Worker(server.address, concurrency=1, drain_timeout=0.2)

        @worker.handler("stubborn")
        def stubborn(_ctx, _payload):
            started.set()
            release.wait(30)  # ignores ctx.cancelled

        def gauge() -> float | None:
            return worker.metrics.registry.get_sample_value("conveyor_worker_sync_handlers_running")

        worker.start()
        try:
            client.enqueue_task(Task(type="stubborn"))
            wait_for(started.is_set, what="the handler to start")
        finally:
            worker.stop()
        try:
            assert not worker.running
            assert (worker.busy_threads(), gauge()) == (1, 1.0)
        finally:
            release.set()
        wait_for(lambda: worker.busy_threads() == 0, what="busy_threads() to fall")
        assert gauge() == 0.0
        assert not [
            thread
            for thread in threading.enumerate()
            if thread.name.startswith("conveyor-handler") and not thread.daemon
        ]


class TestStopFromInsideAHandler:
    @pytest.mark.parametrize("kind", ["sync", "async"])
    def test_stop_returns_at_once_and_the_handlers_outcome_counts(
        self, server, client: Client, db, kind: str
    ) -> None:
        """stop() joined the worker's thread: from an async handler that raised
        RuntimeError (cannot join current thread) and failed the task; from a sync one it
        blocked until the drain timeout, and the handler's task was handed back."""
        calls: list[BaseException | None] = []
        worker = Worker(server.address, concurrency=1, drain_timeout=20)

        def stop_from_inside() -> None:
            try:
                worker.stop()
            except BaseException as exc:
                calls.append(exc)
                raise
            calls.append(None)

        def sync_stopper(_ctx, _payload):
            stop_from_inside()
            return b"stopped myself"

        async def async_stopper(_ctx, _payload):
            stop_from_inside()
            return b"stopped myself"

        worker.register_handler("stopper", sync_stopper if kind == "sync" else async_stopper)
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="stopper", max_retries=0))
            # Well within the 20 s drain: the handler did not wait for itself.
            wait_for(lambda: not worker.running, timeout=10, what="the worker to stop")
        finally:
            worker.stop()
        assert calls == [None]
        status = client.get_task_status(task_id, history=True)
        assert (status.state, status.result) == (TaskState.SUCCEEDED, b"stopped myself")
        assert [event.event for event in status.history] == ["enqueued", "started", "succeeded"]
        assert (
            db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker.worker_id)
            == "stopped"
        )


class TestTheLeaseLoopSurvives:
    @pytest.mark.parametrize("work_stream", [True, False], ids=["stream", "long-poll"])
    def test_an_unexpected_error_taking_work_is_logged_and_leasing_goes_on(
        self, start_server, caplog, monkeypatch, work_stream: bool
    ) -> None:
        """An error nothing expected (here OpenTelemetry failing once as the leases come
        in) ended the lease loop, which nothing awaits: the worker went on heartbeating,
        looking healthy, and never leased again."""
        caplog.set_level(logging.INFO, logger="conveyor")
        server = start_server(
            work_stream=work_stream,
            lease_ttl=timedelta(seconds=2),
            heartbeat_interval=timedelta(milliseconds=500),
        )
        failures = [RuntimeError("tracer provider exploded")]
        enabled = tracing.enabled

        def fails_once() -> bool:
            # In the worker only: the test's own client asks too, as it enqueues.
            if failures and threading.current_thread().name.startswith("conveyor-worker"):
                raise failures.pop()
            return enabled()

        monkeypatch.setattr(tracing, "enabled", fails_once)
        worker = Worker(server.address, concurrency=1)
        worker.register_handler("job", lambda _ctx, payload: payload)
        with running(worker), Client(server.address) as client:
            first = client.enqueue_task(Task(type="job", payload=b"first"))
            wait_for(lambda: not failures, what="the failure")
            second = client.enqueue_task(Task(type="job", payload=b"second"))
            assert wait_final(client, second).result == b"second"
            # The first one's lease was lost with the failure: it ran again after it expired.
            assert wait_final(client, first).result == b"first"
        assert "taking work failed; trying again" in caplog.text
