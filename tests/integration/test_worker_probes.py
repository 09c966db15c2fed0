"""A worker's breakers, heartbeats and Work stream when a server falters for a moment.

- After an outage the breaker's probe is a heartbeat, never a long poll: a long poll as the
  probe held the half-open state for its whole wait, and heartbeats to the only server were
  refused meanwhile.
- One heartbeat to the stream's server that fails while the stream is still heard from
  does not make the worker give the stream up (and lose the leases on their way in it).
- A Work stream opening cancelled because the worker stops counts as no breaker failure:
  the worker's goodbye still reaches its only server.
- A heartbeat that the worker's own breaker refuses, because another call holds the
  half-open probe, waits for the probe instead of counting as a failed heartbeat.
- An attempt whose bookkeeping fails is reported failed at once, not left to expire; while
  the worker stops, the drain neither waits out its timeout for it nor loses its task, and
  a task handed back at stop stays handed back when the codec cannot seal.

Real servers, real workers, real PostgreSQL; outages come from a FaultProxy
(faults/proxy.py), slow statements from locks the test holds, a slow stream opening from a
server whose stream holds back its first answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import threading
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from faults.proxy import FaultProxy
from helpers import (
    async_wait_for,
    free_port,
    holding,
    running,
    started_runtime,
    wait_final,
    wait_for,
)

from conveyor import AsyncClient, Client, Task, TaskState, Worker
from conveyor.breaker import DEFAULT_RESET_TIMEOUT, BreakerPolicy, BreakerState
from conveyor.client import channel as channel_module
from conveyor.client.channel import AddressRing
from conveyor.protocol import convert
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.server import work_stream as server_work_stream
from conveyor.worker import runtime as runtime_module
from conveyor.worker import work_stream as worker_work_stream
from conveyor.worker.context import TaskContext
from conveyor.worker.runtime import _Unreachable

TYPE = "probes.job"
BEAT = timedelta(seconds=1)
# Held by the test: every heartbeat waits for its worker's row (worker_touch).
WORKER_ROWS_LOCKED = "SELECT 1 FROM conveyor_workers FOR UPDATE"


def events_of(caplog: pytest.LogCaptureFixture, *names: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) in names]


def breaker_open(worker: Worker, address: str) -> bool:
    value = worker.metrics.registry.get_sample_value(
        "conveyor_worker_server_breaker_open", {"address": address}
    )
    return value == 1


def held_worker(address: str | list[str]) -> tuple[Worker, threading.Event, threading.Event]:
    """A worker whose handler, on the payload b"held", waits for the test to set `release`.
    Returns (worker, started, release)."""
    started, release = threading.Event(), threading.Event()
    worker = Worker(address, concurrency=2)

    @worker.handler(TYPE)
    def job(_ctx: TaskContext, payload: bytes) -> bytes:
        if payload == b"held":
            started.set()
            release.wait(30)
        return payload.upper()

    return worker, started, release


@pytest.fixture
def first_address_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every AddressRing start at its first address instead of a random one."""
    fake = SimpleNamespace(randrange=lambda _n: 0, uniform=random.uniform)
    monkeypatch.setattr(channel_module, "random", fake)


# --- the probe after an outage --------------------------------------------------------------


@pytest.mark.slow
def test_a_long_poll_is_never_the_probe_of_a_half_open_breaker(
    start_server, caplog: pytest.LogCaptureFixture
) -> None:
    """The only server is cut off until the worker's breaker opens, then comes back.

    The lease loop, sleeping exactly until the breaker let a probe through, used to send
    its LeaseTasks long poll as the probe: it waited its whole `lease_wait` for a task, and
    the breaker stayed half-open meanwhile, refusing every heartbeat ("every server's
    circuit breaker is open") while the leases of running tasks ran out. Now the long poll
    asks for a heartbeat to probe, and the breaker closes within a beat.
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    server = start_server(work_stream=False, heartbeat_interval=BEAT)
    with FaultProxy(server.address, name="link") as link:
        worker = Worker(link.address, concurrency=1, lease_wait=30)
        worker.register_handler(TYPE, lambda _ctx, payload: payload.upper())
        with running(worker), Client(server.address) as client:
            # Told that this server has no Work stream, the worker long-polls from now on.
            wait_for(lambda: events_of(caplog, "stream_unsupported"), what="long polls")
            link.partition("reset")
            wait_for(lambda: breaker_open(worker, link.address), what="the breaker to open")
            link.heal()
            # Open for its reset timeout, then one probe: a heartbeat answers within a beat.
            wait_for(
                lambda: not breaker_open(worker, link.address),
                timeout=DEFAULT_RESET_TIMEOUT.total_seconds() + 4,
                what="the breaker to close after the outage",
            )
            task_id = client.enqueue_task(Task(type=TYPE, payload=b"after"))
            status = wait_final(client, task_id, timeout=10)

    assert (status.state, status.result) == (TaskState.SUCCEEDED, b"AFTER")


# --- a heartbeat that fails alone -----------------------------------------------------------


@pytest.mark.slow
def test_one_failed_heartbeat_does_not_abandon_a_stream_that_is_heard_from(
    start_server, db, caplog: pytest.LogCaptureFixture, first_address_first: None
) -> None:
    """A heartbeat to A fails (its statement times out behind a lock) while A's stream
    delivers a lease; the next heartbeat goes to B, which answers.

    The worker used to cancel the stream on A at B's answer, although A had just sent a
    lease on it: leases on their way in the stream were lost, each an attempt spent and a
    lease's wait. The stream is given up only if it, too, has carried nothing since.
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    a = start_server(heartbeat_interval=BEAT, statement_timeout=timedelta(milliseconds=500))
    b = start_server(heartbeat_interval=BEAT)
    assert a.server is not None
    worker, started, release = held_worker([a.address, b.address])
    with Client(a.address) as client, running(worker):
        streams_on_a = a.server.worker_service.streams
        wait_for(lambda: len(streams_on_a) == 1, what="the worker's stream on A")
        (stream,) = streams_on_a
        with holding(db.url, WORKER_ROWS_LOCKED):
            wait_for(
                lambda: events_of(caplog, "heartbeat_failed"),
                timeout=10,
                what="a heartbeat to A to fail behind the lock",
            )
            # A lease arrives on A's stream after that heartbeat was sent.
            held = client.enqueue_task(Task(type=TYPE, payload=b"held"))
            wait_for(started.is_set, what="the lease on A's stream to start its handler")
        # The next heartbeats go to B and are answered.
        two_more_heartbeats(db, worker.worker_id)
        release.set()
        status = wait_final(client, held, timeout=10)
        assert streams_on_a == {stream}

    assert not events_of(caplog, "stream_abandoned")
    assert (status.state, status.attempts) == (TaskState.SUCCEEDED, 1)


def two_more_heartbeats(db, worker_id: str) -> None:
    """Wait until two heartbeats of the worker commit after this call: the answer of any
    heartbeat in flight at the call was read by the worker before the second was sent."""
    for _ in range(2):
        before = last_heartbeat(db, worker_id)
        wait_for(lambda: last_heartbeat(db, worker_id) > before, timeout=10, what="a heartbeat")  # noqa: B023


def last_heartbeat(db, worker_id: str) -> float:
    """When the worker's latest heartbeat committed (seconds since the epoch)."""
    return float(
        db.fetchval(
            "SELECT extract(epoch FROM last_heartbeat_at) FROM conveyor_workers WHERE id = $1",
            worker_id,
        )
    )


# --- bookkeeping that fails -----------------------------------------------------------------


class ErrorSealingFails:
    """A codec whose key service refuses error texts (results and payloads pass as they are)."""

    def seal(self, data: bytes, *, field: str, task_id: str) -> bytes:
        if field == "error":
            raise RuntimeError("the key service refused the request")
        return data

    def open(self, data: bytes, *, field: str, task_id: str) -> bytes:
        return data


def test_an_attempt_whose_settling_fails_is_reported_failed_at_once(
    start_server, caplog: pytest.LogCaptureFixture
) -> None:
    """The server refuses the result as too large; the worker's replacement report (failed,
    saying why) cannot be sealed, as the codec raises.

    The attempt was left unreported: the task sat `running` for its whole lease and then
    failed as "lease expired", blaming the worker. Now it fails at once, saying the worker
    could not settle it, and the worker counts the report as failed.
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    server = start_server(
        heartbeat_interval=BEAT, lease_ttl=timedelta(seconds=30), max_payload_bytes=1024
    )
    worker = Worker(server.address, concurrency=1, codec=ErrorSealingFails())
    worker.register_handler(TYPE, lambda _ctx, _payload: b"r" * 2048)
    with Client(server.address) as client, running(worker):
        task_id = client.enqueue_task(Task(type=TYPE, max_retries=0))
        status = wait_final(client, task_id, timeout=10)

    assert status.state is TaskState.FAILED
    assert "could not settle the attempt (RuntimeError)" in (status.last_error or "")
    assert "refused the request" not in (status.last_error or "")
    assert worker.metrics.registry.get_sample_value("conveyor_worker_reports_failed_total") == 1
    assert events_of(caplog, "worker_bug")


# --- bookkeeping that fails while the worker stops ------------------------------------------


def worker_state(db, worker: Worker) -> str | None:
    return db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker.worker_id)


def salvaged(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether an attempt's bookkeeping failed, and the attempt was salvaged."""
    return any(
        r.getMessage() == "attempt bookkeeping failed" for r in events_of(caplog, "worker_bug")
    )


def stop_in_background(worker: Worker) -> threading.Thread:
    """`worker.stop()` on a thread of its own (its join waits up to 30 s)."""
    stopping = threading.Thread(target=worker.stop, kwargs={"timeout": 30}, daemon=True)
    stopping.start()
    return stopping


def draining_with_one_task(
    client: Client, db, worker: Worker, started: threading.Event
) -> tuple[str, threading.Thread]:
    """Enqueue one task for the started `worker`; once its handler runs, stop the worker in
    the background, and return when it drains: the task's id and the stopping thread."""
    task_id = client.enqueue_task(Task(type=TYPE, max_retries=0))
    wait_for(started.is_set, what="the handler to start")
    stopping = stop_in_background(worker)
    wait_for(lambda: worker_state(db, worker) == "draining", what="the drain to begin")
    return task_id, stopping


def test_an_attempt_salvaged_during_the_drain_neither_holds_up_the_stop_nor_is_lost(
    start_server, db, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker drains (60 s allowed) while a handler runs; the handler then returns a
    result the server refuses as too large, and the worker's replacement report (failed,
    saying why) cannot be sealed: the attempt's bookkeeping fails, and it is salvaged.

    The drain must end with the attempt, not wait out its timeout, and the salvaged
    attempt's report must reach the server before the worker says goodbye.
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    server = start_server(heartbeat_interval=BEAT, max_payload_bytes=1024)
    started, release = threading.Event(), threading.Event()
    worker = Worker(server.address, concurrency=1, codec=ErrorSealingFails(), drain_timeout=60)

    @worker.handler(TYPE)
    def job(_ctx: TaskContext, _payload: bytes) -> bytes:
        started.set()
        release.wait(30)
        return b"r" * 2048

    worker.start()
    try:
        with Client(server.address) as client:
            task_id, stopping = draining_with_one_task(client, db, worker, started)
            release.set()
            stopping.join(15)
            status = client.get_task_status(task_id)
    finally:
        release.set()
        worker.stop()

    assert not stopping.is_alive(), "the drain waited for its timeout"
    assert worker.running is False
    assert status.state is TaskState.FAILED
    assert "could not settle the attempt (RuntimeError)" in (status.last_error or "")
    assert worker_state(db, worker) == "stopped"
    assert salvaged(caplog)


def test_an_attempt_salvaged_after_the_drain_stopped_it_is_handed_back(
    start_server, db, caplog: pytest.LogCaptureFixture
) -> None:
    """The drain is cut short (`hand_back_now`); the async handler, cancelled, finishes
    anyway with a result the server refuses as too large, and the replacement report
    cannot be sealed: the attempt, stopped for the shutdown, is salvaged.

    It is handed back, attempt unspent, before the worker says goodbye.
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    server = start_server(heartbeat_interval=BEAT, max_payload_bytes=1024)
    started = threading.Event()
    worker = Worker(server.address, concurrency=1, codec=ErrorSealingFails(), drain_timeout=60)

    @worker.handler(TYPE)
    async def job(_ctx: TaskContext, _payload: bytes) -> bytes:
        started.set()
        # Finishes its work when cancelled: its result still counts within the grace.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)
        return b"r" * 2048

    worker.start()
    try:
        with Client(server.address) as client:
            task_id, stopping = draining_with_one_task(client, db, worker, started)
            worker.hand_back_now()
            stopping.join(15)
    finally:
        worker.stop()

    assert not stopping.is_alive()
    assert worker.running is False
    row = db.task(task_id)
    assert (row["state"], row["attempt"], row["lease_expires_at"]) == ("queued", 0, None)
    assert [e["event"] for e in db.events(task_id)] == ["enqueued", "started", "released"]
    assert worker_state(db, worker) == "stopped"
    assert salvaged(caplog)


def test_a_task_handed_back_at_stop_is_not_failed_by_a_codec_that_cannot_seal(
    start_server, db
) -> None:
    """The drain ends with a handler still running, and the codec cannot seal error texts
    (its key service is down).

    The hand-back's note ("worker shutting down") was sealed like a handler's error: the
    codec raised, and the attempt was reported failed instead of handed back, an attempt
    spent at every stop (the task failed for good without retries left). The note is the
    worker's own and says nothing of the task: it goes unsealed, and the task is queued
    again, attempt unspent.
    """
    server = start_server(heartbeat_interval=BEAT)
    started = threading.Event()
    worker = Worker(server.address, concurrency=1, codec=ErrorSealingFails(), drain_timeout=0)

    @worker.handler(TYPE)
    def job(ctx: TaskContext, _payload: bytes) -> bytes:
        started.set()
        ctx.cancelled.wait(30)
        return b"stopped"

    worker.start()
    try:
        with Client(server.address) as client:
            task_id = client.enqueue_task(Task(type=TYPE, max_retries=0))
            wait_for(started.is_set, what="the handler to start")
    finally:
        worker.stop(timeout=15)

    assert worker.running is False
    row = db.task(task_id)
    assert (row["state"], row["attempt"], row["lease_expires_at"]) == ("queued", 0, None)
    assert [e["event"] for e in db.events(task_id)] == ["enqueued", "started", "released"]


# --- a stream opening cancelled by the stop -------------------------------------------------


def test_a_stream_opening_cancelled_by_the_stop_is_no_breaker_failure(
    start_server, db, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The only server holds back its answer to the worker's Work stream (the stream's
    first message arrived, the empty answer that accepts it does not come); the worker is
    stopped meanwhile, which cancels the opening once STREAM_LEAVE_TIMEOUT has passed.

    The cancelled opening proves nothing about the server: counted as a failure, it moved
    the server's breaker towards open, and the hand-backs and the goodbye that follow could
    meet "every server's circuit breaker is open" (here at once: the worker's breakers open
    at the first failure). Now it is abandoned: the breaker has counted nothing, and the
    goodbye reaches the server.
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    first_message, answer = threading.Event(), threading.Event()
    serve = server_work_stream.WorkStream.serve

    async def serve_late(self: server_work_stream.WorkStream, first: pb.WorkRequest) -> None:
        first_message.set()
        await asyncio.to_thread(answer.wait, 30)
        await serve(self, first)

    monkeypatch.setattr(server_work_stream.WorkStream, "serve", serve_late)
    # Breakers that open at the first failure: one miscounted call is enough to shut the
    # worker's goodbye out, and any later answer cannot hide the count.
    monkeypatch.setattr(
        runtime_module,
        "AddressRing",
        functools.partial(AddressRing, breaker=BreakerPolicy(failure_threshold=1)),
    )
    server = start_server(heartbeat_interval=BEAT)
    worker = Worker(server.address, concurrency=1)
    worker.register_handler(TYPE, lambda _ctx, payload: payload)
    worker.start()
    try:
        wait_for(first_message.is_set, what="the stream's first message on the server")
        worker.stop(timeout=20)
    finally:
        answer.set()
        worker.stop()

    assert worker.running is False
    assert worker_state(db, worker) == "stopped"
    assert worker._runtime is not None
    breaker = worker._runtime.ring.breakers[server.address]
    assert (breaker.state, breaker._failures) == (BreakerState.CLOSED, 0)
    assert not [r for r in caplog.records if "circuit breaker" in r.getMessage()]
    assert not events_of(caplog, "heartbeat_failed")


def test_leases_sent_on_a_stream_still_opening_at_the_stop_are_handed_back(
    start_server, db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server has accepted the worker's Work stream and leased it a task on it, but the
    worker has not yet read the acceptance when it is stopped.

    The stop cancelled the opening: the lease the server had committed and sent was never
    read, and its task sat `running` until the lease expired, an attempt spent. Now the
    stop waits (up to STREAM_LEAVE_TIMEOUT) for the opening to end, then half-closes the
    stream as it does an open one: the lease is read and handed back, attempt unspent.
    """
    read_acceptance = threading.Event()
    real_open = worker_work_stream.WorkStream.open

    async def open_reading_late(self: Any, *args: Any) -> None:
        call = self._call
        self._call = SimpleNamespace(
            write=call.write,
            done_writing=call.done_writing,
            read=lambda: held_read(call),
        )
        try:
            await real_open(self, *args)
        finally:
            self._call = call

    async def held_read(call: Any) -> Any:
        await asyncio.to_thread(read_acceptance.wait, 30)
        return await call.read()

    monkeypatch.setattr(worker_work_stream.WorkStream, "open", open_reading_late)
    server = start_server(heartbeat_interval=BEAT)
    worker = Worker(server.address, concurrency=1, drain_timeout=0)
    worker.register_handler(TYPE, lambda _ctx, payload: payload)
    worker.start()
    stopping = threading.Thread(target=worker.stop, kwargs={"timeout": 30})
    try:
        with Client(server.address) as client:
            task_id = client.enqueue_task(Task(type=TYPE, max_retries=0))
        wait_for(lambda: db.task(task_id)["state"] == "running", what="the lease on the stream")
        stopping.start()
        wait_for(lambda: worker._runtime.draining, what="the worker to drain")
    finally:
        read_acceptance.set()
        if stopping.is_alive():
            stopping.join(30)
        worker.stop()

    assert worker.running is False
    row = db.task(task_id)
    assert (row["state"], row["attempt"], row["lease_expires_at"]) == ("queued", 0, None)
    assert [e["event"] for e in db.events(task_id)] == ["enqueued", "started", "released"]


# --- a heartbeat while another call holds the probe -----------------------------------------


async def test_a_heartbeat_refused_for_a_probe_in_flight_is_no_failure(
    start_server, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The only server's breaker is half-open, and a report holds its probe: the report's
    statement waits behind the test's lock on its task. A regular heartbeat comes meanwhile.

    The worker's own breaker refused that heartbeat, and the worker took the refusal for a
    failure: a `heartbeat_failed` warning, a count in `heartbeat_failures_total`, and no
    heartbeat until the next interval, although the server was up all along. Now the
    heartbeat waits for the probe to settle and goes as soon as the breaker closes; past a
    heartbeat's deadline it is deferred, and counted as nothing.

    The worker's runtime is driven by the test, on a real server: a breaker open, half-open
    and holding a probe at the moments the test needs cannot be had from its loops.
    """
    caplog.set_level(logging.DEBUG, logger="conveyor")
    server = start_server(heartbeat_interval=BEAT)
    worker = Worker(server.address, concurrency=1)
    worker.register_handler(TYPE, lambda _ctx, payload: payload)
    runtime = await started_runtime(worker)
    # Opens at the first failure, and is half-open soon after.
    runtime.ring = AddressRing(
        [server.address], BreakerPolicy(failure_threshold=1, reset_timeout=0.2)
    )
    breaker = runtime.ring.breakers[server.address]
    locks = await asyncpg.connect(database_url)
    reporting: asyncio.Task[pb.ReportResultResponse] | None = None
    try:
        await runtime.register()
        async with AsyncClient(server.address) as client:
            task_id = await client.enqueue_task(Task(type=TYPE))
        leased = await runtime.call(
            "LeaseTasks",
            pb.LeaseTasksRequest(
                worker_id=worker.worker_id,
                task_types=[TYPE],
                max_tasks=1,
                wait=convert.duration(timedelta(seconds=5)),
            ),
        )
        (lease,) = leased.leases
        # A real failure opens the breaker: a heartbeat whose statement waits behind the
        # lock on the worker's row, past its deadline.
        async with locks.transaction():
            await locks.execute(WORKER_ROWS_LOCKED)
            with pytest.raises(_Unreachable, match="DEADLINE_EXCEEDED"):
                await runtime.call(
                    "Heartbeat", pb.HeartbeatRequest(worker_id=worker.worker_id), timeout=0.3
                )
        await async_wait_for(breaker.probe_free, timeout=5, what="the breaker to be half-open")
        holding_the_task = locks.transaction()
        await holding_the_task.start()
        await locks.execute("SELECT 1 FROM conveyor_tasks WHERE id = $1::uuid FOR UPDATE", task_id)
        reporting = asyncio.create_task(
            runtime.call(
                "ReportResult",
                pb.ReportResultRequest(
                    worker_id=worker.worker_id,
                    task_id=lease.task_id,
                    lease_id=lease.lease_id,
                    outcome=pb.OUTCOME_SUCCEEDED,
                ),
            )
        )
        await async_wait_for(
            lambda: breaker.state is BreakerState.HALF_OPEN and not breaker.probe_free(),
            timeout=5,
            what="the report to hold the probe",
        )

        # Past its deadline (a quarter lease: 0.5 s here) with the probe still out.
        runtime.lease_duration = timedelta(seconds=2)
        before = runtime.loop.time()
        assert await runtime.beat(before) == before
        assert not events_of(caplog, "heartbeat_failed")
        assert events_of(caplog, "heartbeat_deferred")
        assert not reporting.done()

        # The probe is answered while the heartbeat waits: it goes at once.
        runtime.lease_duration = timedelta(seconds=30)
        beating = asyncio.create_task(runtime.beat(before))
        await async_wait_for(
            lambda: len(events_of(caplog, "heartbeat_waiting_for_probe")) == 2 or beating.done(),
            timeout=5,
            what="the heartbeat to wait for the probe",
        )
        await holding_the_task.rollback()
        await reporting  # answered: the probe settled, and closed the breaker
        assert await asyncio.wait_for(beating, timeout=5) > before
        assert breaker.state is BreakerState.CLOSED
    finally:
        await locks.close()
        if reporting is not None:
            reporting.cancel()
            await asyncio.gather(reporting, return_exceptions=True)
        await runtime.close_channels()
        runtime.pool.shutdown()

    assert not events_of(caplog, "heartbeat_failed")
    assert not worker.metrics.registry.get_sample_value("conveyor_worker_heartbeat_failures_total")


# --- closing the channels while a hand-back opens one ----------------------------------------


async def test_closing_the_channels_survives_a_channel_opened_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hand-back the stopping worker gave up waiting for goes on retrying, and may open
    a channel to another server while the worker closes its channels. close_channels
    iterated over the dict while awaiting each close: the new entry made it raise
    "dictionary changed size during iteration", out of the worker's last step."""
    first, second = (f"127.0.0.1:{free_port()}" for _ in range(2))
    worker = Worker([first, second], concurrency=1)
    runtime = await started_runtime(worker)
    runtime.stub(first)
    channel = runtime.channels[first]
    real_close = channel.close

    async def close_while_a_call_opens_another(grace: float | None = None) -> None:
        runtime.stub(second)  # what a retrying hand-back's call does meanwhile
        await real_close(grace)

    monkeypatch.setattr(channel, "close", close_while_a_call_opens_another)
    await runtime.close_channels()

    # The late channel stays, for the call that opened it; the next close takes it.
    assert list(runtime.channels) == [second]
    await runtime.close_channels()
    assert runtime.channels == {}
