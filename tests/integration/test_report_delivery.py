"""Outcomes that must reach the server whatever the connection does on the way.

- A Work stream whose connection dies silently (a black hole: no FIN, no RST): the outcome
  waiting on it goes through another server, the worker leases there, and the cut-off
  server stops claiming for the worker within its keepalive bound.
- Results too large to travel together, or at all: batches are cut by bytes, and a result
  larger than a message fails its task as refused, as one over the payload limit does.
- A report whose first send was applied but whose answer was lost: its retry is answered
  as applied, not counted and logged as a fencing rejection.

Real servers, real workers, real PostgreSQL; the connections are cut by a FaultProxy
(faults/proxy.py) and commits are held back by a lock the test holds.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import pytest
from faults.proxy import FaultProxy
from helpers import free_port, holding, running, wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker
from conveyor.storage.queries import SQL
from conveyor.worker.runtime import CALL_TIMEOUT

TYPE = "delivery.job"


def held_worker(
    address: str | list[str],
    *,
    concurrency: int = 1,
    only: bytes | None = None,
    result: bytes | None = None,
    call_timeout: timedelta | float = CALL_TIMEOUT,
) -> tuple[Worker, threading.Event, threading.Event]:
    """A worker whose handler, once started (on `only`'s payload, if given), waits for the
    test to set `release`; it returns `result`, else the payload in capitals.
    Returns (worker, started, release)."""
    started, release = threading.Event(), threading.Event()
    worker = Worker(address, concurrency=concurrency, call_timeout=call_timeout)

    @worker.handler(TYPE)
    def job(_ctx: object, payload: bytes) -> bytes:
        if only is None or payload == only:
            started.set()
            release.wait(30)
        return payload.upper() if result is None else result

    return worker, started, release


# Short leases keep every scenario well under half a minute: a report that waits for its
# dead stream until the lease runs out fails these tests within six seconds of the cut.
LEASE = timedelta(seconds=6)
BEAT = timedelta(seconds=1)
# The workers' call deadline in the tests that wait one out (10 s by default), so that each
# takes a second or two instead of ten; they wait for its effect for at most half the
# default, so a worker that kept the default deadline fails them.
CALL_DEADLINE = timedelta(seconds=1)
WITHIN_DEADLINE_AND_RETRY = 5.0
MIB = 1024 * 1024


def events_of(caplog: pytest.LogCaptureFixture, *names: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) in names]


# --- a stream that dies silently -----------------------------------------------------------


@pytest.mark.slow
def test_an_outcome_on_a_silently_dead_stream_goes_through_another_server(
    start_server, caplog: pytest.LogCaptureFixture
) -> None:
    """Server A is cut off by a black hole while the handler runs; B is healthy.

    The outcome used to sit on A's dead stream until the lease ran out after its first
    send, then was dropped: the task ended FAILED "LeaseExpired" although the handler had
    succeeded, and the worker leased nothing meanwhile. Now the worker gives up on the
    stream once heartbeats to A fail while B answers (or the batch's deadline passes),
    reports through B, and leases there.
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    a = start_server(lease_ttl=LEASE, heartbeat_interval=BEAT)
    b_address = f"127.0.0.1:{free_port()}"
    with FaultProxy(a.address, name="link-a") as link:
        worker, started, release = held_worker([link.address, b_address])

        try:
            with running(worker):
                # B listens only now, so the worker registered and opened its stream on A.
                assert a.server is not None
                wait_for(lambda: len(a.server.worker_service.streams) == 1, what="stream on A")
                b = start_server(grpc_listen=b_address, lease_ttl=LEASE, heartbeat_interval=BEAT)
                assert b.server is not None
                with Client(b.address) as client:
                    first = client.enqueue_task(Task(type=TYPE, payload=b"first", max_retries=0))
                    wait_for(started.is_set, what="the handler to start")
                    link.partition("blackhole")
                    cut_at = time.monotonic()
                    release.set()
                    status = wait_final(client, first, timeout=LEASE.total_seconds() * 2)
                    delivered_after = time.monotonic() - cut_at
                    # The worker leases again, from B, at once.
                    later = client.enqueue_task(Task(type=TYPE, payload=b"later", max_retries=0))
                    later_status = wait_final(client, later, timeout=5)
                    assert len(b.server.worker_service.streams) == 1
        finally:
            link.heal()

    assert status.state is TaskState.SUCCEEDED, status.last_error
    assert [e.event for e in status.history] == ["enqueued", "started", "succeeded"]
    assert status.result == b"FIRST"
    assert delivered_after < LEASE.total_seconds(), delivered_after
    assert later_status.state is TaskState.SUCCEEDED
    assert later_status.attempts == 1
    assert not events_of(caplog, "report_failed", "report_rejected", "stale_report_rejected")


@pytest.mark.slow
def test_a_server_stops_claiming_for_a_worker_whose_connection_died_silently(
    start_server,
) -> None:
    """A keeps no Work stream, and claims nothing, for a worker it can no longer reach.

    Without keepalive pings a silently dead connection looked alive to A for half a minute
    and more: A claimed new tasks into it up to the worker's free room, and each sat
    `running` for a whole lease and then went back with an attempt spent.
    """
    keepalive = timedelta(seconds=1)
    a = start_server(
        lease_ttl=LEASE,
        heartbeat_interval=BEAT,
        keepalive_interval=keepalive,
        keepalive_timeout=keepalive,
    )
    b_address = f"127.0.0.1:{free_port()}"
    with FaultProxy(a.address, name="link-a") as link:
        worker, started, release = held_worker(
            [link.address, b_address], concurrency=4, only=b"first"
        )

        try:
            with running(worker):
                assert a.server is not None
                streams_on_a = a.server.worker_service.streams
                wait_for(lambda: len(streams_on_a) == 1, what="stream on A")
                b = start_server(grpc_listen=b_address, lease_ttl=LEASE, heartbeat_interval=BEAT)
                with Client(b.address) as client:
                    first = client.enqueue_task(Task(type=TYPE, payload=b"first"))
                    wait_for(started.is_set, what="the handler to start")
                    link.partition("blackhole")
                    cut_at = time.monotonic()
                    # Pings every second, answered within a second: A notices in two or
                    # three seconds; the bound leaves room for a loaded machine.
                    wait_for(
                        lambda: not streams_on_a,
                        timeout=(keepalive * 2).total_seconds() + 4,
                        what="A to end the stream of the worker it can no longer reach",
                    )
                    noticed_after = time.monotonic() - cut_at
                    later = [
                        client.enqueue_task(Task(type=TYPE, payload=b"later%d" % i))
                        for i in range(3)
                    ]
                    # Run at once, through B: none was claimed into the dead connection.
                    statuses = [wait_final(client, task_id, timeout=5) for task_id in later]
                    release.set()
                    first_status = wait_final(client, first, timeout=10)
        finally:
            link.heal()

    assert noticed_after < (keepalive * 2).total_seconds() + 4
    assert [(s.state, s.attempts) for s in statuses] == [(TaskState.SUCCEEDED, 1)] * 3
    assert (first_status.state, first_status.attempts) == (TaskState.SUCCEEDED, 1)


@pytest.mark.slow
def test_a_batch_unanswered_on_the_stream_past_a_call_deadline_goes_by_call(
    start_server, db, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch of outcomes on the Work stream gets the deadline a ReportResults call has:
    the worker's `call_timeout`.

    Here the server takes longer than that to commit it (a lock holds the commit). The
    worker gives the stream up, sends the outcome by call, and leases on a new stream; the
    second send finds the outcome applied. A batch on the stream used to wait as long as
    the stream looked open, however long that was.
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    # Statements may run longer than a call's deadline, as a slow commit does.
    server = start_server(statement_timeout=timedelta(seconds=60))
    assert server.server is not None
    db.execute(STALL_SUCCESS_SQL)
    worker, started, release = held_worker(
        server.address, only=b"first", call_timeout=CALL_DEADLINE
    )

    with Client(server.address) as client, running(worker):
        first = client.enqueue_task(Task(type=TYPE, payload=b"first"))
        wait_for(started.is_set, what="the handler to start")
        with holding(db.url, f"SELECT pg_advisory_lock({LOCK_KEY})"):
            release.set()
            wait_for(
                lambda: events_of(caplog, "stream_abandoned"),
                timeout=WITHIN_DEADLINE_AND_RETRY,
                what="the worker to give up on the stream",
            )
            wait_for(lambda: success_waiting(db) >= 2, what="the outcome to be sent by call")
        status = wait_final(client, first)
        later = client.enqueue_task(Task(type=TYPE, payload=b"later"))
        later_status = wait_final(client, later, timeout=10)

    (abandoned,) = events_of(caplog, "stream_abandoned")
    assert "a batch of outcomes had no answer within 1s" in abandoned.getMessage()
    assert_answered_as_applied(status, caplog, worker, server)
    assert (later_status.state, later_status.attempts) == (TaskState.SUCCEEDED, 1)


# --- results too large to travel together, or at all ----------------------------------------


@pytest.mark.parametrize("work_stream", [False, True], ids=["calls", "stream"])
def test_results_too_large_for_one_message_together_are_all_delivered(
    start_server, caplog: pytest.LogCaptureFixture, work_stream: bool
) -> None:
    """Thirty results of about 1 MB finish together: more than the server's 16 MiB message.

    The batch used to be refused whole (RESOURCE_EXHAUSTED) and every outcome in it
    dropped (by calls), or it broke the Work stream and the leases in flight with it.
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    server = start_server(work_stream=work_stream, lease_ttl=LEASE, heartbeat_interval=BEAT)
    count = 30
    all_running = threading.Barrier(count)
    worker = Worker(server.address, concurrency=count)

    @worker.handler(TYPE)
    def big(_ctx, _payload: bytes) -> bytes:
        all_running.wait(20)  # finish together, so their reports queue up together
        return b"r" * 1_000_000

    with Client(server.address) as client, running(worker):
        ids = client.enqueue_tasks([Task(type=TYPE, max_retries=0) for _ in range(count)])
        statuses = [wait_final(client, task_id, timeout=20) for task_id in ids]

    assert [(s.state, s.attempts) for s in statuses] == [(TaskState.SUCCEEDED, 1)] * count
    assert all(s.result == b"r" * 1_000_000 for s in statuses)
    assert not events_of(caplog, "report_failed", "lease_refused")


@pytest.mark.parametrize("work_stream", [False, True], ids=["calls", "stream"])
def test_a_result_larger_than_a_message_fails_the_task_as_refused(
    start_server, caplog: pytest.LogCaptureFixture, work_stream: bool
) -> None:
    """A 20 MiB result cannot travel in the server's 16 MiB message.

    Like a result over the payload limit, it fails the task at once, for good, saying
    why. It used to be dropped at every attempt (breaking the Work stream each time), and
    the task ended FAILED "LeaseExpired" after running every attempt in full.
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    server = start_server(work_stream=work_stream, lease_ttl=LEASE, heartbeat_interval=BEAT)
    runs: list[int] = []
    worker = Worker(server.address, concurrency=1)

    @worker.handler(TYPE)
    def huge(ctx, _payload: bytes) -> bytes:
        runs.append(ctx.attempt)
        return b"x" * (20 * MIB)

    with Client(server.address) as client, running(worker):
        task_id = client.enqueue_task(Task(type=TYPE, max_retries=1))
        status = wait_final(client, task_id, timeout=20)

    assert (status.state, status.attempts, runs) == (TaskState.FAILED, 1, [1])
    assert status.last_error.startswith("InvalidTask: the result was refused: result is "), (
        status.last_error
    )
    assert "larger than" in status.last_error
    assert not events_of(caplog, "report_failed", "lease_refused")


def test_an_error_message_larger_than_a_message_is_cut_and_reported(
    start_server, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler's exception with a 20 MiB message: the failure is still recorded, not
    dropped into a lease expiry. Its message is cut on the worker to the 8,000 characters
    the server keeps (codec.kept_text); it used to be replaced by a note of its size."""
    caplog.set_level(logging.INFO, logger="conveyor")
    server = start_server(lease_ttl=LEASE, heartbeat_interval=BEAT)
    worker = Worker(server.address, concurrency=1)

    @worker.handler(TYPE)
    def wordy(_ctx, _payload: bytes) -> bytes:
        raise ValueError("x" * (20 * MIB))

    with Client(server.address) as client, running(worker):
        task_id = client.enqueue_task(Task(type=TYPE, max_retries=0))
        status = wait_final(client, task_id, timeout=20)

    assert (status.state, status.attempts) == (TaskState.FAILED, 1)
    assert status.last_error == "ValueError: " + "x" * (8000 - 12) + "... (truncated)"
    assert [e.event for e in status.history] == ["enqueued", "started", "failed"]
    assert not events_of(caplog, "report_failed", "lease_refused")


# --- an answer lost after the outcome was applied -------------------------------------------

# Held by the test: a report's statement waits for it before it touches the task (it writes
# the history too), while heartbeats, which write no history, go on.
HISTORY_LOCKED = "LOCK TABLE conveyor_task_events IN SHARE MODE"


LOCK_KEY = 4343
# Each success of a TYPE task, once it holds the task's row, waits for the advisory lock the
# test holds: a second send of the outcome then waits for the first to commit.
STALL_SUCCESS_SQL = f"""
CREATE FUNCTION delivery_stall() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({LOCK_KEY});
    RETURN NEW;
END $$;
CREATE TRIGGER delivery_stall BEFORE UPDATE ON conveyor_tasks FOR EACH ROW
    WHEN (NEW.state = 'succeeded' AND NEW.type = '{TYPE}')
    EXECUTE FUNCTION delivery_stall();
"""


def success_waiting(db) -> int:
    """How many success statements wait for a lock.

    Told by their opening comment: pg_stat_activity keeps only the first kilobyte of a
    statement, and heartbeats wait for the task's row too. The joined write skips a row
    another statement holds, and that success is then applied alone (`task_succeed`).
    """
    return db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND (starts_with(query, $1) OR starts_with(query, $2))",
        SQL["task_succeed_many"][:60],
        SQL["task_succeed"][:60],
    )


def assert_answered_as_applied(
    status, caplog: pytest.LogCaptureFixture, worker: Worker, server
) -> None:
    assert status.state is TaskState.SUCCEEDED
    assert [e.event for e in status.history] == ["enqueued", "started", "succeeded"]
    assert events_of(caplog, "report_repeated")
    assert not events_of(caplog, "report_rejected", "stale_report_rejected", "report_failed")
    assert worker.metrics.registry.get_sample_value("conveyor_worker_reports_rejected_total") == 0
    stale = server.server.metrics.registry.get_sample_value(
        "conveyor_stale_completions_rejected_total"
    )
    assert stale == 0


def test_a_report_sent_again_after_the_stream_broke_during_its_commit_is_answered_as_applied(
    start_server, db, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection is reset while the server commits the outcome; the worker sends it
    again (by call, then on a new stream) and finds the task finished by this very lease.

    It used to be refused as stale: the worker counted a rejected report and logged the
    outcome as refused, and the server counted a stale completion, for a task that
    succeeded normally (alerts on either fired around server restarts).
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    server = start_server()
    assert server.server is not None
    with FaultProxy(server.address, name="link") as link:
        worker, started, release = held_worker(link.address, result=b"fine")

        with Client(server.address) as client, running(worker):
            task_id = client.enqueue_task(Task(type=TYPE))
            wait_for(started.is_set, what="the handler to start")
            try:
                with holding(db.url, HISTORY_LOCKED):
                    release.set()
                    wait_for(lambda: success_waiting(db), what="the commit to wait for the lock")
                    # The answer's way back is cut while the commit waits.
                    link.partition("reset")
                wait_for(lambda: db.task(task_id)["state"] == "succeeded", what="the commit")
            finally:
                link.heal()
            wait_for(
                lambda: events_of(caplog, "report_repeated", "stale_report_rejected"),
                what="the worker's second send to be answered",
            )
            status = wait_final(client, task_id)

    assert_answered_as_applied(status, caplog, worker, server)


@pytest.mark.slow
def test_a_report_sent_again_after_its_call_timed_out_during_the_commit_is_answered_as_applied(
    start_server, db, caplog: pytest.LogCaptureFixture
) -> None:
    """By calls (a server without the Work stream): the commit outlasts the call's
    deadline (the worker's `call_timeout`), the worker sends the outcome again, and the
    second send finds it applied."""
    caplog.set_level(logging.INFO, logger="conveyor")
    # Statements may run longer than a call's deadline, as a slow commit does.
    server = start_server(work_stream=False, statement_timeout=timedelta(seconds=60))
    assert server.server is not None
    db.execute(STALL_SUCCESS_SQL)
    worker, started, release = held_worker(
        server.address, result=b"fine", call_timeout=CALL_DEADLINE
    )

    with Client(server.address) as client, running(worker):
        task_id = client.enqueue_task(Task(type=TYPE))
        wait_for(started.is_set, what="the handler to start")
        with holding(db.url, f"SELECT pg_advisory_lock({LOCK_KEY})"):
            release.set()
            # The first send waits for the lock past its deadline; the second send's
            # statement then waits for the task's row, which the first holds.
            wait_for(
                lambda: success_waiting(db) >= 2,
                timeout=WITHIN_DEADLINE_AND_RETRY,
                what="the worker to send again",
            )
        status = wait_final(client, task_id)
        wait_for(
            lambda: events_of(caplog, "report_repeated", "stale_report_rejected"),
            what="the worker's second send to be answered",
        )

    assert_answered_as_applied(status, caplog, worker, server)
