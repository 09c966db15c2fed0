"""Worker life cycle: draining on stop, handing back unfinished work, concurrency, config."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from helpers import free_port, wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker, event_loop
from conveyor.errors import ConfigError, ServerUnavailable
from conveyor.server.worker_service import WorkerService
from conveyor.worker import runtime


def logged_events(caplog) -> set[str]:
    return {getattr(record, "event", "") for record in caplog.records}


def worker_state(db, worker: Worker) -> str | None:
    return db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker.worker_id)


def start_in_background(worker: Worker) -> tuple[threading.Thread, list[BaseException]]:
    """`worker.start(timeout=60)` on a thread of its own: (the thread, what start raised)."""
    failures: list[BaseException] = []

    def start() -> None:
        try:
            worker.start(timeout=60)
        except BaseException as exc:
            failures.append(exc)

    starting = threading.Thread(target=start)
    starting.start()
    return starting, failures


class TestDrainOnStop:
    def test_stop_lets_a_short_in_flight_task_finish(self, server, client: Client, db) -> None:
        """stop() with a 5 s drain timeout waits for a 0.5 s task, which ends SUCCEEDED."""
        started = threading.Event()

        async def short(ctx, payload):
            started.set()
            await asyncio.sleep(0.5)
            return b"drained"

        worker = Worker(server.address, concurrency=1, drain_timeout=timedelta(seconds=5))
        worker.register_handler("short", short)
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="short"))
            wait_for(started.is_set, timeout=10, what="the handler to start")
        finally:
            worker.stop()

        assert worker.running is False
        row = db.task(task_id)
        assert row["state"] == "succeeded"
        assert row["result"] == b"drained"
        assert row["attempt"] == 1
        status = client.get_task_status(task_id, history=True)
        assert status.state is TaskState.SUCCEEDED
        assert [e.event for e in status.history] == ["enqueued", "started", "succeeded"]


class TestNothingLeftToDrain:
    """An attempt already settled (timed out, or its task cancelled) whose handler ignores
    its cancellation has nothing left to report: the drain does not wait for it.

    It used to wait on the attempt's runner, which waits for the handler (to keep its
    concurrency slot): every such stop took the whole drain timeout, then logged
    "handing back task" for a task already failed or cancelled.
    """

    DRAIN = timedelta(seconds=20)

    @pytest.mark.parametrize("how", ["timed out", "cancelled"])
    def test_a_sync_handler_past_its_attempt(self, server, client: Client, caplog, how) -> None:
        heard, release = threading.Event(), threading.Event()

        def stubborn(ctx, _payload):
            ctx.cancelled.wait(30)
            heard.set()
            release.wait(30)  # ignores ctx.cancelled on purpose
            return b"too late"

        self.assert_stop_is_prompt(server, client, caplog, how, stubborn, heard.is_set, release.set)

    @pytest.mark.parametrize("how", ["timed out", "cancelled"])
    def test_an_async_handler_past_its_attempt(self, server, client: Client, caplog, how) -> None:
        heard, release = threading.Event(), threading.Event()

        async def stubborn(_ctx, _payload):
            while not release.is_set():  # swallows every cancellation on purpose
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    heard.set()
            return b"too late"

        self.assert_stop_is_prompt(server, client, caplog, how, stubborn, heard.is_set, release.set)

    def assert_stop_is_prompt(self, server, client, caplog, how, handler, heard, release):
        caplog.set_level(logging.INFO, logger="conveyor")
        worker = Worker(server.address, concurrency=1, drain_timeout=self.DRAIN)
        worker.register_handler("past.attempt", handler)
        worker.start()
        try:
            timeout = timedelta(seconds=1) if how == "timed out" else timedelta(minutes=5)
            task_id = client.enqueue_task(Task(type="past.attempt", timeout=timeout, max_retries=0))
            if how == "cancelled":
                wait_for(
                    lambda: client.get_task_status(task_id).state is TaskState.RUNNING,
                    what="the handler to start",
                )
                client.cancel_task(task_id)
            wait_for(heard, timeout=20, what="the handler to hear of its attempt's end")
            began = time.monotonic()
            worker.stop()
            stop_took = time.monotonic() - began
        finally:
            release()
            worker.stop()
        assert stop_took < self.DRAIN.total_seconds() / 2, stop_took
        final = {"timed out": TaskState.FAILED, "cancelled": TaskState.CANCELLED}[how]
        assert wait_final(client, task_id).state is final
        assert "task_released" not in logged_events(caplog)


class TestHandBackOnStop:
    def test_stop_hands_back_a_long_task_without_spending_its_attempt(
        self, server, client: Client, db
    ) -> None:
        """A task outliving the drain timeout is RELEASED to QUEUED at once, attempt unspent."""
        started = threading.Event()
        saw_cancelled = threading.Event()

        async def endless(ctx, payload):
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                saw_cancelled.set()
                raise
            return b"never"

        # Seconds, as Task's timeout and RetryPolicy take them (once timedelta only).
        worker = Worker(server.address, concurrency=1, drain_timeout=0.3)
        worker.register_handler("endless", endless)
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="endless", max_retries=0))
            wait_for(started.is_set, timeout=10, what="the handler to start")
            assert db.task(task_id)["state"] == "running"
            began = time.monotonic()
        finally:
            worker.stop()
        stop_took = time.monotonic() - began

        # Checked right after stop returns: no waiting for the 30 s lease to expire.
        row = db.task(task_id)
        assert stop_took < 5
        assert worker.running is False
        assert saw_cancelled.is_set()
        assert row["state"] == "queued"
        assert row["attempt"] == 0
        assert row["lease_expires_at"] is None
        events = db.events(task_id)
        assert [e["event"] for e in events] == ["enqueued", "started", "released"]
        assert events[-1]["state"] == "queued"
        assert events[-1]["attempt"] == 1
        assert events[-1]["worker_id"] == worker.worker_id

        seen_attempts: list[int] = []

        def quick(ctx, payload):
            seen_attempts.append(ctx.attempt)
            return b"finished by the second"

        second = Worker(server.address, concurrency=1)
        second.register_handler("endless", quick)
        second.start()
        try:
            status = wait_final(client, task_id)
        finally:
            second.stop()

        # max_retries=0: had the released attempt been spent, no attempt would remain.
        assert status.state is TaskState.SUCCEEDED
        assert status.attempts == 1
        assert status.result == b"finished by the second"
        assert status.worker_id == second.worker_id
        assert seen_attempts == [1]

    def test_hand_back_now_ends_a_stop_that_waits_for_the_drain(
        self, server, client: Client, db
    ) -> None:
        """A stop() blocked on a 60 s drain in one thread returns as soon as another thread
        calls hand_back_now(): the task is handed back at once, attempt unspent, and the
        worker unregisters (what a second Ctrl-C on `conveyor dev` does)."""
        started = threading.Event()

        async def endless(ctx, payload):
            started.set()
            await asyncio.sleep(60)
            return b"never"

        worker = Worker(server.address, concurrency=1, drain_timeout=timedelta(seconds=60))
        worker.register_handler("endless", endless)
        worker.start()
        stopping = threading.Thread(target=worker.stop)
        try:
            task_id = client.enqueue_task(Task(type="endless"))
            wait_for(started.is_set, timeout=10, what="the handler to start")
            stopping.start()
            wait_for(lambda: worker_state(db, worker) == "draining", what="the drain to begin")
            assert stopping.is_alive()
            began = time.monotonic()
            worker.hand_back_now()
            stopping.join(10)
            took = time.monotonic() - began
        finally:
            worker.stop()
        assert not stopping.is_alive()
        assert took < 5, f"stop returned {took:.1f}s after hand_back_now"
        assert worker.running is False
        row = db.task(task_id)
        assert (row["state"], row["attempt"], row["lease_expires_at"]) == ("queued", 0, None)
        assert [e["event"] for e in db.events(task_id)] == ["enqueued", "started", "released"]
        assert worker_state(db, worker) == "stopped"

    def test_stop_hands_back_a_sync_handler_without_waiting_for_its_thread(
        self, server, client: Client, db
    ) -> None:
        """A sync handler ignoring cancellation is handed back at once; stop does not wait."""
        started = threading.Event()
        finished = threading.Event()

        def stubborn(ctx, payload):
            started.set()
            try:
                time.sleep(4)  # the work; it ignores ctx.cancelled on purpose
            finally:
                finished.set()
            return b"too late"

        worker = Worker(server.address, concurrency=1, drain_timeout=timedelta(milliseconds=300))
        worker.register_handler("stubborn", stubborn)
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="stubborn"))
            wait_for(started.is_set, timeout=10, what="the handler to start")
            began = time.monotonic()
        finally:
            worker.stop()
        stop_took = time.monotonic() - began

        row = db.task(task_id)
        still_running = not finished.is_set()
        wait_for(finished.is_set, timeout=10, what="the handler thread to return")
        assert stop_took < 3
        assert still_running
        assert row["state"] == "queued"
        assert row["attempt"] == 0
        assert [e["event"] for e in db.events(task_id)] == ["enqueued", "started", "released"]
        # The thread's late return reports nothing: the lease was handed back.
        assert db.task(task_id)["state"] == "queued"

    @pytest.mark.slow
    def test_stop_waits_out_every_step_after_the_drain_by_default(
        self, start_server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The server holds the hand-back and the goodbye: the worker waits `HAND_BACK_WAIT`
        for the one and `GOODBYE_TIMEOUT` for the other, 18 s after a drain of 0 s.
        `stop()` used to wait 15 s beyond the drain by default and returned with the worker
        still running; a process that exited then cut its hand-backs off."""
        held = threading.Event()

        def holding_answer(method: Any) -> Any:
            async def held_method(self: Any, request: Any, context: Any) -> Any:
                await asyncio.to_thread(held.wait, 60)
                return await method(self, request, context)

            return held_method

        for name in ("ReportResult", "ReportResults", "UnregisterWorker"):
            method = getattr(WorkerService, name)
            monkeypatch.setattr(WorkerService, name, holding_answer(method))
        server = start_server()
        started = threading.Event()

        def until_stopped(ctx, _payload):
            started.set()
            ctx.cancelled.wait(60)

        worker = Worker(server.address, concurrency=1, drain_timeout=0)
        worker.register_handler("held.hand_back", until_stopped)
        worker.start()
        try:
            with Client(server.address) as client:
                client.enqueue_task(Task(type="held.hand_back"))
            wait_for(started.is_set, timeout=10, what="the handler to start")
            worker.stop()
            assert worker.running is False
        finally:
            held.set()
            worker.stop()


class TestNoLeasingAfterStop:
    def test_stopped_worker_leases_nothing_more(self, server, client: Client, db) -> None:
        """Tasks enqueued after stop() stay QUEUED: the stopped worker leases nothing."""
        worker = Worker(server.address, concurrency=2)
        worker.register_handler("mine", lambda _ctx, _payload: b"ok")
        worker.start()
        try:
            first = client.enqueue_task(Task(type="mine"))
            assert wait_final(client, first).state is TaskState.SUCCEEDED
            began = time.monotonic()
        finally:
            worker.stop()
        # The worker was idle in a 20 s lease long poll: stop must not wait it out.
        assert time.monotonic() - began < 5
        assert worker.running is False

        later = client.enqueue_task(Task(type="mine"))
        # A sentinel worker for another type proves the system kept working meanwhile.
        sentinel_worker = Worker(server.address, concurrency=1)
        sentinel_worker.register_handler("sentinel", lambda _ctx, _payload: b"ok")
        sentinel_worker.start()
        try:
            sentinel = client.enqueue_task(Task(type="sentinel"))
            assert wait_final(client, sentinel).state is TaskState.SUCCEEDED
        finally:
            sentinel_worker.stop()

        row = db.task(later)
        assert row["state"] == "queued"
        assert row["attempt"] == 0
        assert [e["event"] for e in db.events(later)] == ["enqueued"]


class TestWorkerRow:
    def test_worker_row_goes_to_stopped_after_stop(self, server, db) -> None:
        """The worker's row in conveyor_workers is 'active' while running, 'stopped' after."""
        worker = Worker(server.address, concurrency=1)
        worker.register_handler("mine", lambda _ctx, _payload: None)
        worker.start()
        try:
            assert worker.running is True
            assert worker_state(db, worker) == "active"
            types = db.fetchval(
                "SELECT task_types FROM conveyor_workers WHERE id = $1", worker.worker_id
            )
            assert list(types) == ["mine"]
        finally:
            worker.stop()

        assert worker_state(db, worker) == "stopped"


class TestConcurrency:
    def test_at_most_concurrency_handlers_run_at_once(self, server, client: Client) -> None:
        """With concurrency=3, 10 async tasks never run more than 3 at a time (and do overlap)."""
        lock = threading.Lock()
        running = 0
        peak = 0

        async def tracked(ctx, payload):
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            try:
                await asyncio.sleep(0.2)  # the work
            finally:
                with lock:
                    running -= 1
            return payload

        task_ids = client.enqueue_tasks(
            [Task(type="tracked", payload=str(i).encode()) for i in range(10)]
        )
        worker = Worker(server.address, concurrency=3)
        worker.register_handler("tracked", tracked)
        worker.start()
        try:
            statuses = [wait_final(client, task_id) for task_id in task_ids]
        finally:
            worker.stop()

        assert [s.state for s in statuses] == [TaskState.SUCCEEDED] * 10
        assert [s.result for s in statuses] == [str(i).encode() for i in range(10)]
        assert all(s.attempts == 1 for s in statuses)
        assert 2 <= peak <= 3, peak

    def test_at_most_concurrency_sync_handlers_run_at_once(self, server, client: Client) -> None:
        """With concurrency=2, 6 sync tasks never run more than 2 at a time (and do overlap)."""
        lock = threading.Lock()
        running = 0
        peak = 0

        def tracked(ctx, payload):
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            try:
                time.sleep(0.2)  # the work
            finally:
                with lock:
                    running -= 1
            return payload

        task_ids = client.enqueue_tasks([Task(type="tracked-sync") for _ in range(6)])
        worker = Worker(server.address, concurrency=2)
        worker.register_handler("tracked-sync", tracked)
        worker.start()
        try:
            statuses = [wait_final(client, task_id) for task_id in task_ids]
        finally:
            worker.stop()

        assert [s.state for s in statuses] == [TaskState.SUCCEEDED] * 6
        assert peak == 2, peak


class TestOnlyRegisteredTypes:
    def test_worker_never_leases_a_type_it_has_no_handler_for(
        self, server, client: Client, db
    ) -> None:
        """A worker with a handler for 'mine' only runs 'mine'; an 'other' task stays QUEUED."""
        other = client.enqueue_task(Task(type="other"))
        mine = client.enqueue_task(Task(type="mine"))

        worker = Worker(server.address, concurrency=2)
        worker.register_handler("mine", lambda _ctx, _payload: b"mine")
        worker.start()
        try:
            status = wait_final(client, mine)
            other_row = db.task(other)
        finally:
            worker.stop()

        assert status.state is TaskState.SUCCEEDED
        assert other_row["state"] == "queued"
        assert other_row["attempt"] == 0
        assert [e["event"] for e in db.events(other)] == ["enqueued"]
        assert db.task(other)["state"] == "queued"


class TestConfiguration:
    @pytest.mark.parametrize("bad_type", ["", "has space", "semi;colon", "x" * 129])
    def test_registering_an_invalid_type_name_raises_config_error(self, bad_type: str) -> None:
        """register_handler rejects a type name outside the documented pattern."""
        worker = Worker("127.0.0.1:1")
        with pytest.raises(ConfigError):
            worker.register_handler(bad_type, lambda _ctx, _payload: None)
        assert worker.registry.task_types() == []

    def test_registering_a_type_twice_raises_config_error(self) -> None:
        """A second handler for the same type raises ConfigError; the first one stays."""

        def first(ctx, payload):
            return b"first"

        worker = Worker("127.0.0.1:1")
        worker.register_handler("dup", first)
        with pytest.raises(ConfigError):
            worker.register_handler("dup", lambda _ctx, _payload: b"second")
        registered = worker.registry.get("dup")
        assert registered is not None
        assert registered.fn is first

    def test_starting_without_handlers_raises_config_error(self, server) -> None:
        """start() with no handler registered raises ConfigError before connecting."""
        worker = Worker(server.address)
        try:
            with pytest.raises(ConfigError):
                worker.start(timeout=timedelta(seconds=5))
            assert worker.running is False
        finally:
            worker.stop()

    @pytest.mark.parametrize("server", ["nothing listens", "never answers"])
    def test_starting_with_no_server_raises_server_unavailable(self, server: str) -> None:
        """start() raises ServerUnavailable when no server answers within its timeout.

        Also when a server accepts the connection and never answers (a hung process, a
        blackholed link): each registration call had the whole call_timeout, and
        start(timeout=1) returned after it (found by a review). Now each call gets what is
        left of start's timeout.
        """
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        if server == "never answers":
            silent.listen(16)  # never accepted: the kernel completes the handshake
        worker = Worker(f"127.0.0.1:{silent.getsockname()[1]}", call_timeout=30)
        worker.register_handler("mine", lambda _ctx, _payload: None)
        began = time.monotonic()
        try:
            with pytest.raises(ServerUnavailable):
                worker.start(timeout=1)
            took = time.monotonic() - began
            assert worker.running is False
        finally:
            worker.stop()
            silent.close()
        assert took < 10, f"start(timeout=1) took {took:.1f}s"


class TestMisuse:
    def test_handler_without_its_type_is_a_config_error(self) -> None:
        """`@worker.handler` without `("type")` registered nothing and replaced the function
        with the decorator: that type's tasks stayed queued for good, without a word."""
        worker = Worker("127.0.0.1:1")
        with pytest.raises(ConfigError, match=r"@worker.handler\('task.type'\)"):

            @worker.handler  # type: ignore[arg-type]
            def send(_ctx, _payload):
                return None

        assert worker.registry.task_types() == []

    def test_run_on_another_thread_is_a_config_error(self) -> None:
        """It was signal.signal's ValueError, "signal only works in main thread"."""
        worker = Worker("127.0.0.1:1")
        worker.register_handler("mine", lambda _ctx, _payload: None)
        raised: list[BaseException] = []

        def run() -> None:
            try:
                worker.run()
            except BaseException as exc:
                raised.append(exc)

        runner = threading.Thread(target=run)
        runner.start()
        runner.join(30)
        assert len(raised) == 1
        assert isinstance(raised[0], ConfigError), raised
        assert "call start() and stop()" in str(raised[0])

    def test_a_start_that_failed_can_be_tried_again(self, start_server) -> None:
        """The second start() said "this worker was already started", though it never ran:
        a loop retrying while the servers come up could never succeed."""
        port = free_port()
        worker = Worker(f"127.0.0.1:{port}")
        worker.register_handler("mine", lambda _ctx, _payload: None)
        try:
            with pytest.raises(ServerUnavailable):
                worker.start(timeout=0.5)
            assert worker.running is False
            start_server(grpc_listen=f"127.0.0.1:{port}")
            worker.start(timeout=30)
            assert worker.running is True
        finally:
            worker.stop()
        assert worker.running is False


class TestStopWhileRegistering:
    def test_stop_during_registration_ends_start_at_once(self, caplog) -> None:
        """With no server up, start() retries for its whole timeout; a stop() meanwhile
        made it raise ServerUnavailable at its next retry. Now it returns at once, not
        started."""
        caplog.set_level(logging.INFO, logger="conveyor")
        worker = Worker(f"127.0.0.1:{free_port()}", concurrency=1)
        worker.register_handler("anything", lambda _ctx, _payload: None)
        starting, failures = start_in_background(worker)
        try:
            wait_for(
                lambda: "worker_register_retrying" in logged_events(caplog),
                what="the worker to retry its registration",
            )
            began = time.monotonic()
            worker.stop()
            starting.join(10)
            took = time.monotonic() - began
        finally:
            worker.stop()
            starting.join(70)
        assert not starting.is_alive()
        assert failures == []
        assert took < 3, f"start() returned {took:.1f}s after stop()"
        assert worker.running is False
        assert "stopped before any server accepted the worker" in caplog.text

    def test_a_stop_before_the_workers_loop_exists_is_not_lost(self, monkeypatch) -> None:
        """A stop() in the moment between the worker's thread starting and its event loop
        existing was dropped: start() went on registering (here, for its whole 60 s)."""
        in_thread = threading.Event()
        proceed = threading.Event()
        make_loop = event_loop.loop_factory() or asyncio.new_event_loop

        def held_loop() -> asyncio.AbstractEventLoop:
            in_thread.set()
            proceed.wait(30)
            return make_loop()

        monkeypatch.setattr(event_loop, "loop_factory", lambda: held_loop)
        worker = Worker(f"127.0.0.1:{free_port()}", concurrency=1)
        worker.register_handler("anything", lambda _ctx, _payload: None)
        starting, failures = start_in_background(worker)
        try:
            wait_for(in_thread.is_set, what="the worker's thread to start")
            worker.stop(timeout=0)  # the loop does not exist yet: nothing to wait for
            proceed.set()
            starting.join(10)
            returned_at_once = not starting.is_alive()
        finally:
            proceed.set()
            worker.stop()
            starting.join(70)
        assert returned_at_once
        assert failures == []
        assert worker.running is False


class TestLongPollReplyAtStop:
    def test_leases_arriving_as_the_worker_stops_are_handed_back(
        self, start_server, db, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A LeaseTasks reply and the stop landing in the same loop iteration: the stop
        cancelled the lease loop before it resumed, the reply's leases were dropped, and
        each task sat `running` until its lease expired, an attempt spent (FAILED with
        max_retries=0, never having run). The interleaving is forced: once a reply with
        leases arrives, the stop is requested and the lease loop cancelled before it resumes
        with it. (Before the fix the call ran in the lease loop itself, so this test fails
        there by running the handler rather than by losing the lease.)"""
        server = start_server(work_stream=False)
        original = runtime._Runtime.call
        armed = threading.Event()

        async def call(self: Any, method: str, request: Any, **options: Any) -> Any:
            response = await original(self, method, request, **options)
            if method == "LeaseTasks" and response.leases and armed.is_set():
                armed.clear()
                # What stop_leasing() does, at the worst moment: the reply is in, and the
                # lease loop is cancelled before it resumes with it.
                self.request_stop()
                (lease_loop,) = [t for t in asyncio.all_tasks() if t.get_name() == "lease-loop"]
                lease_loop.cancel()
            return response

        monkeypatch.setattr(runtime._Runtime, "call", call)
        ran: list[str] = []
        worker = Worker(server.address, concurrency=1, lease_wait=5)
        worker.register_handler("race.t", lambda ctx, _payload: ran.append(ctx.task_id))
        worker.start()
        try:
            armed.set()
            with Client(server.address) as client:
                task_id = client.enqueue_task(Task(type="race.t", max_retries=0))
            wait_for(lambda: not worker.running, timeout=30, what="the worker to stop")
        finally:
            worker.stop()
        assert ran == []
        row = db.task(task_id)
        assert (row["state"], row["attempt"], row["lease_expires_at"]) == ("queued", 0, None)
        assert [e["event"] for e in db.events(task_id)][-1] == "released"
