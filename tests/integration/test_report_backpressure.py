"""A worker whose reports cannot get through stops leasing, after a bounded number of tasks.

Reports are stalled for real: a trigger makes the server's success update wait for an
advisory lock the test holds, while claims go through. The worker may keep two slot-fulls
of outcomes in delivery (one reporting while the next runs), and then leases no more.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import asyncpg
import pytest
from helpers import running, wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker
from conveyor.errors import PermanentFailure

TYPE = "backpressure.job"
LOCK_KEY = 4242
CONCURRENCY = 2
REPORTING_LIMIT = 2 * CONCURRENCY


def stall_sql(name: str, state: str, task_type: str) -> str:
    """A trigger that makes each update of a `task_type` task to `state` wait for the
    advisory lock the test holds (`advisory_lock_held`), while every other write goes on."""
    return f"""
CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({LOCK_KEY});
    RETURN NEW;
END $$;
CREATE TRIGGER {name} BEFORE UPDATE ON conveyor_tasks FOR EACH ROW
    WHEN (NEW.state = '{state}' AND NEW.type = '{task_type}')
    EXECUTE FUNCTION {name}();
"""


STALL_SQL = stall_sql("backpressure_stall", "succeeded", TYPE)


@contextmanager
def advisory_lock_held(url: str) -> Iterator[None]:
    """Hold the exclusive advisory lock on a connection of its own until the block ends."""
    locked = threading.Event()
    release = threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
            locked.set()
            await asyncio.to_thread(release.wait, 60)
        finally:
            await conn.close()  # ends the session, and with it the lock

    holder = threading.Thread(target=asyncio.run, args=(hold(),))
    holder.start()
    assert locked.wait(10), "could not take the advisory lock"
    try:
        yield
    finally:
        release.set()
        holder.join(10)


def test_a_worker_whose_reports_stall_stops_leasing_after_two_slot_fulls(server, db) -> None:
    db.execute(STALL_SQL)

    def count(state: str) -> int:
        return db.fetchval(
            "SELECT count(*) FROM conveyor_tasks WHERE type = $1 AND state = $2", TYPE, state
        )

    worker = Worker(server.address, concurrency=CONCURRENCY)

    @worker.handler(TYPE)
    async def quick(_ctx, _payload: bytes) -> None:
        return None

    with Client(server.address) as client, running(worker):
        with advisory_lock_held(db.url):
            ids = [client.enqueue_task(Task(type=TYPE)) for _ in range(10)]
            wait_for(
                lambda: count("running") >= REPORTING_LIMIT,
                what=f"{REPORTING_LIMIT} tasks leased while their reports stall",
            )
            # An invariant over a window, not a wait: however long the reports stall, the
            # worker takes no more. (The last lease before the limit may ask for every
            # free slot, hence up to one slot-full less one beyond it.)
            window_end = time.monotonic() + 1.5
            while time.monotonic() < window_end:
                held = count("running")
                assert REPORTING_LIMIT <= held <= REPORTING_LIMIT + CONCURRENCY - 1
                assert count("queued") == len(ids) - held
                # Slots held, not outcomes travelling: never above the worker's slots.
                in_flight = worker.metrics.registry.get_sample_value(
                    "conveyor_worker_tasks_in_flight"
                )
                assert in_flight is not None
                assert in_flight <= CONCURRENCY
        # The lock is gone: the stalled reports commit, and the worker takes the rest.
        for task_id in ids:
            assert wait_final(client, task_id).state == TaskState.SUCCEEDED


REFUSED_TYPE = "refused.job"
STALL_FAILURES_SQL = stall_sql("refused_stall", "failed", REFUSED_TYPE)


def test_a_report_answered_unavailable_alone_is_sent_again(
    start_server, db, caplog: pytest.LogCaptureFixture
) -> None:
    """The server answers one report of a batch with UNAVAILABLE when its database fails
    that statement (here a statement timeout, while a lock holds the failure's update). The
    outcome stands and must go again: it used to be dropped as refused, and the expired
    lease then ran the attempt a second time (a PermanentFailure charged the card twice)."""
    server = start_server(
        statement_timeout=timedelta(seconds=1),
        lease_ttl=timedelta(seconds=4),
        heartbeat_interval=timedelta(seconds=1),
    )
    db.execute(STALL_FAILURES_SQL)
    caplog.set_level(logging.INFO, logger="conveyor")
    attempts: list[int] = []

    def retried() -> bool:
        return any(getattr(r, "event", None) == "report_retried" for r in caplog.records)

    worker = Worker(server.address, concurrency=1)

    @worker.handler(REFUSED_TYPE)
    def charge(ctx, _payload: bytes) -> bytes:
        attempts.append(ctx.attempt)
        raise PermanentFailure("card declined")

    with Client(server.address) as client, running(worker):
        with advisory_lock_held(db.url):
            task_id = client.enqueue_task(Task(type=REFUSED_TYPE, max_retries=3))
            # Until the stalled failure report is cancelled by the statement timeout and
            # the server answers it UNAVAILABLE (the lost outcome's lease would expire in 4 s).
            wait_for(retried, timeout=15, what="the worker to send the refused outcome again")
        status = wait_final(client, task_id)

    assert attempts == [1]
    assert status.state is TaskState.FAILED
    assert status.attempts == 1
    assert status.last_error == "PermanentFailure: card declined"
    assert [event.event for event in status.history] == ["enqueued", "started", "failed"]
