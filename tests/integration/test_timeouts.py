"""Timeouts: an attempt that outlives its timeout is stopped, reported timed out, retried."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from datetime import UTC, timedelta

from google.protobuf.duration_pb2 import Duration
from helpers import RERUN_AFTER_LEASE_EXPIRED, metric_samples, wait_final, wait_for, worker_stub

from conveyor import Client, Task, TaskState, Worker
from conveyor.protocol.v1 import conveyor_pb2 as pb

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
            lease_ttl=timedelta(seconds=60),
            heartbeat_interval=timedelta(seconds=30),
            worker_lost_after=timedelta(seconds=150),
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


def cut_short(http_url: str) -> dict[tuple[str, str], float]:
    """conveyor_attempts_cut_short_total by (type, reason), those counted (all start at 0)."""
    return {
        (sample.labels["type"], sample.labels["reason"]): sample.value
        for sample in metric_samples(http_url)
        if sample.name == "conveyor_attempts_cut_short_total" and sample.value
    }


class TestWhatTheReaperCallsAnExpiredLease:
    """The reaper records `timed_out` only for an attempt whose worker was still heard from
    at or after the deadline; a lease that ran out because its worker went silent first is
    `lease_expired`, even when the reaper only finds it after the deadline (the lease lasts
    until deadline + grace, and the sweeper waits 15 s of silence before ending it)."""

    def test_a_worker_killed_before_the_deadline_is_lease_expired(
        self, start_server, spawn_worker, ledger, db
    ) -> None:
        """kill -9 a real `conveyor worker` process while its handler runs a task with a 5 s
        timeout. Its lease then runs to the deadline plus the grace, and the reaper takes the
        task back after the deadline: that was recorded as `timed_out` ("attempt exceeded its
        timeout ... and its worker did not report it") and counted as a timeout, though the
        worker died long before the attempt could time out."""
        server = start_server(deadline_grace=timedelta(seconds=1))
        worker = spawn_worker(server.address, concurrency=1)
        with Client(server.address) as client:
            task_id = client.enqueue_task(
                Task(type="sleep", payload=b"60", timeout=timedelta(seconds=5), max_retries=0)
            )
            wait_for(
                lambda: [row for row in ledger.started() if row["task_id"] == task_id],
                what="the handler to start",
            )
            worker.signal(signal.SIGKILL)
            worker.wait(10)
            [before] = db.fetch(
                "SELECT t.state, t.deadline_at, w.last_heartbeat_at < t.deadline_at AS silent "
                "FROM conveyor_tasks AS t JOIN conveyor_workers AS w ON w.id = t.worker_id "
                "WHERE t.id = $1::uuid",
                task_id,
            )
            # The scenario: the worker's last word came before the deadline, and nothing
            # was reported (the kill came first).
            assert (before["state"], before["silent"]) == ("running", True), dict(before)
            status = wait_final(client, task_id)

        events = db.events(task_id)
        assert [e["event"] for e in events] == ["enqueued", "started", "lease_expired"]
        # Found after the deadline: the case that used to be called a timeout.
        assert events[-1]["at"] >= before["deadline_at"]
        assert status.state is TaskState.FAILED
        assert status.last_error is not None
        assert status.last_error.startswith("LeaseExpired"), status.last_error
        assert cut_short(server.http_url) == {("sleep", "lease_expired"): 1.0}

    def test_a_live_worker_overrunning_is_timed_out_a_silent_one_lease_expired(
        self, start_server, db
    ) -> None:
        """Two raw-gRPC workers lease a task each, with a 1 s timeout, and neither reports.
        One goes on heartbeating past the deadline (a handler it cannot stop, a report it
        cannot send): its attempt timed out. The other never says another word after its
        lease: it was gone before the deadline, and its lease ran out. The reaper finds both
        leases expired after the deadline, and used to call both timeouts."""
        server = start_server(deadline_grace=timedelta(seconds=1))
        with Client(server.address) as client, worker_stub(server.address) as workers:
            leases = {}
            for worker_id in ("w-overruns", "w-silent"):
                task_type = f"reap.{worker_id}"
                client.enqueue_task(
                    Task(type=task_type, timeout=timedelta(seconds=1), max_retries=0)
                )
                workers.RegisterWorker(
                    pb.RegisterWorkerRequest(
                        worker_id=worker_id, host="h", pid=1, task_types=[task_type], concurrency=1
                    ),
                    timeout=10,
                )
                [leases[worker_id]] = workers.LeaseTasks(
                    pb.LeaseTasksRequest(
                        worker_id=worker_id,
                        task_types=[task_type],
                        max_tasks=1,
                        wait=Duration(seconds=5),
                    ),
                    timeout=15,
                ).leases
            overrun = leases["w-overruns"]
            stop = threading.Event()

            def beat() -> None:
                # The worker's own rhythm, not a wait for anything: a beat every 200 ms.
                while not stop.wait(0.2):
                    workers.Heartbeat(
                        pb.HeartbeatRequest(
                            worker_id="w-overruns",
                            leases=[
                                pb.LeaseRef(task_id=overrun.task_id, lease_id=overrun.lease_id)
                            ],
                        ),
                        timeout=10,
                    )

            beating = threading.Thread(target=beat, daemon=True)
            beating.start()
            try:
                overran = wait_final(client, overrun.task_id)
                silent = wait_final(client, leases["w-silent"].task_id)
            finally:
                stop.set()
                beating.join(15)

        assert [e.event for e in overran.history] == ["enqueued", "started", "timed_out"]
        assert overran.last_error is not None
        assert overran.last_error.startswith("TimeoutError"), overran.last_error
        assert [e.event for e in silent.history] == ["enqueued", "started", "lease_expired"]
        assert silent.last_error is not None
        assert silent.last_error.startswith("LeaseExpired: worker w-silent"), silent.last_error
        assert cut_short(server.http_url) == {
            ("reap.w-overruns", "timed_out"): 1.0,
            ("reap.w-silent", "lease_expired"): 1.0,
        }
