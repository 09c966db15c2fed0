"""A lease granted after a long heartbeat silence runs on: it is fresh.

`stop_if_silent` measured silence from the worker's last successful heartbeat, for every
attempt alike. A heartbeat can fail alone while the Work stream still leases and reports
(docs/architecture.md, "The Work stream": "A heartbeat can fail alone, its statement timing
out on a slow database or its deadline passing, while the stream still delivers leases and
answers"). A worker whose heartbeats have failed for a lease duration, and which is then
given a new lease on its stream, stopped that attempt at its next failed heartbeat, a
fraction of a second after the server granted it a whole lease. The handler's outcome was
then never reported; the task waited for the lease to expire and ran again (here, with
`max_retries=0`, it failed without its result).

The worker knows each lease's own age (`_Attempt.lease_renewed_at`, which report retries
use for the lease's known expiry); the self-stop now uses it too. Found by a review.

The fault: the server's heartbeat statement (`worker_touch`) fails with UNAVAILABLE while
the test says so; leases and reports go on the stream untouched. The handler returns at
the second heartbeat failure after it started (logged in the loop's step that then calls
`stop_if_silent`, so the stop, if any, comes first), well within its 6 s lease.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

import pytest
from helpers import wait_for

from conveyor import Client, Task, TaskState, Worker
from conveyor.errors import ServerUnavailable
from conveyor.storage import queries

TYPE = "outage.fresh_lease"
LEASE = timedelta(seconds=6)


class Watch(logging.Handler):
    """Records the heartbeat failures and lease losses; lets the handler go on the second
    heartbeat failure after it started."""

    def __init__(self, started: threading.Event, go: threading.Event) -> None:
        super().__init__(level=logging.DEBUG)
        self.started = started
        self.go = go
        self.longest_silence = 0.0
        self.failures_after_start = 0
        self.lease_lost: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if event == "task_lease_lost":
            self.lease_lost.append(record)
        elif event == "heartbeat_failed":
            self.longest_silence = max(self.longest_silence, float(record.args[1]))  # type: ignore[index]
            if self.started.is_set():
                self.failures_after_start += 1
                if self.failures_after_start >= 2:
                    self.go.set()


def test_a_lease_granted_during_heartbeat_silence_is_not_stopped_at_once(
    start_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = threading.Event()
    original_touch = queries.worker_touch

    async def worker_touch(conn, **kwargs):  # type: ignore[no-untyped-def]
        if failing.is_set():
            raise ServerUnavailable("the heartbeat statement timed out (injected)")
        return await original_touch(conn, **kwargs)

    monkeypatch.setattr(queries, "worker_touch", worker_touch)
    server = start_server(
        lease_ttl=LEASE,
        heartbeat_interval=timedelta(seconds=1),
        worker_lost_after=timedelta(seconds=120),
    )
    assert server.server is not None

    started, go = threading.Event(), threading.Event()
    runs: list[int] = []

    def job(ctx, _payload):  # type: ignore[no-untyped-def]
        runs.append(ctx.attempt)
        started.set()
        go.wait(30)  # deaf to ctx.cancelled: it returns its result either way
        return b"done"

    worker = Worker(server.address, concurrency=1)
    worker.register_handler(TYPE, job)
    watch = Watch(started, go)
    logger = logging.getLogger("conveyor.worker")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watch)
    try:
        with Client(server.address) as client:
            worker.start()
            try:
                streams = server.server.worker_service.streams
                wait_for(lambda: len(streams) == 1, timeout=10, what="the worker's stream")
                failing.set()
                # Idle, the worker goes a whole lease without a heartbeat getting through.
                wait_for(
                    lambda: watch.longest_silence >= LEASE.total_seconds(),
                    timeout=30,
                    what="a lease duration of failed heartbeats",
                )
                task_id = client.enqueue_task(Task(type=TYPE, max_retries=0))
                wait_for(started.is_set, timeout=10, what="the handler to start")
                wait_for(
                    lambda: watch.lease_lost or client.get_task_status(task_id).state.is_final,
                    timeout=30,
                    what="the task to finish or its attempt to be stopped",
                )
                lost_while_fresh = list(watch.lease_lost)
                failing.clear()
                go.set()
                status = client.get_task_status(task_id)
                if not lost_while_fresh:
                    status = wait_for(
                        lambda: (s := client.get_task_status(task_id)).state.is_final and s,
                        timeout=15,
                        what="the task to finish",
                    )
            finally:
                failing.clear()
                go.set()
                worker.stop()
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)

    assert not lost_while_fresh, (
        "the worker stopped an attempt whose lease it had been granted moments before: "
        + "; ".join(r.getMessage() for r in lost_while_fresh)
    )
    assert (status.state, status.attempts, runs) == (TaskState.SUCCEEDED, 1, [1])
