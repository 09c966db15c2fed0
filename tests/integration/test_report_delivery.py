"""Outcomes that must reach the server whatever the connection does on the way.

- A Work stream whose connection dies silently (a black hole: no FIN, no RST): the outcome
  waiting on it goes through another server, the worker leases there, and the cut-off
  server stops claiming for the worker within its keepalive bound.
- Results too large to travel together, or at all: batches are cut by bytes, and a result
  larger than a message fails its task as refused, as one over the payload limit does.
- A report whose first send was applied but whose answer was lost: its retry is answered
  as applied, not counted and logged as a fencing rejection.

Real servers, real workers, real PostgreSQL; the connections are cut by a FaultProxy
(faults/proxy.py) and commits are held back by a trigger waiting on an advisory lock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import asyncpg
import pytest
from faults.proxy import FaultProxy
from helpers import running, wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker

TYPE = "delivery.job"
# Short leases keep every scenario well under half a minute: a report that waits for its
# dead stream until the lease runs out fails these tests within six seconds of the cut.
LEASE = timedelta(seconds=6)
BEAT = timedelta(seconds=1)
MIB = 1024 * 1024


def events_of(caplog: pytest.LogCaptureFixture, *names: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) in names]


# --- an answer lost after the outcome was applied -------------------------------------------

LOCK_KEY = 4343
# Each success of a TYPE task waits for the advisory lock the test holds: the report is
# applied only when the test lets it, after its answer's way back was cut.
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


@contextmanager
def advisory_lock_held(url: str) -> Iterator[None]:
    """Hold the exclusive advisory lock on a connection of its own until the block ends."""
    locked, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
            locked.set()
            await asyncio.to_thread(release.wait, 60)
        finally:
            await conn.close()

    holder = threading.Thread(target=asyncio.run, args=(hold(),))
    holder.start()
    assert locked.wait(10), "could not take the advisory lock"
    try:
        yield
    finally:
        release.set()
        holder.join(10)


@pytest.mark.parametrize("work_stream", [False, True], ids=["calls", "stream"])
def test_a_retried_report_whose_first_send_was_applied_is_answered_as_applied(
    start_server, db, caplog: pytest.LogCaptureFixture, work_stream: bool
) -> None:
    """The connection breaks while the server commits the outcome; the worker sends it again.

    The second send finds the task already finished by this very lease. It used to be
    refused as stale: the worker counted a rejected report and logged the outcome as
    refused, and the server counted a stale completion, for a task that succeeded
    normally (alerts on either fired around every server restart).
    """
    caplog.set_level(logging.INFO, logger="conveyor")
    server = start_server(work_stream=work_stream)
    assert server.server is not None
    db.execute(STALL_SUCCESS_SQL)
    started, release = threading.Event(), threading.Event()
    with FaultProxy(server.address, name="link") as link:
        worker = Worker(link.address, concurrency=1)

        @worker.handler(TYPE)
        def job(_ctx, _payload: bytes) -> bytes:
            started.set()
            release.wait(30)
            return b"fine"

        with Client(server.address) as client, running(worker):
            task_id = client.enqueue_task(Task(type=TYPE))
            wait_for(started.is_set, what="the handler to start")
            try:
                with advisory_lock_held(db.url):
                    release.set()
                    wait_for(
                        lambda: db.fetchval(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
                        ),
                        what="the success to wait for the lock",
                    )
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

    assert status.state is TaskState.SUCCEEDED
    assert [e.event for e in status.history] == ["enqueued", "started", "succeeded"]
    assert not events_of(caplog, "report_rejected", "stale_report_rejected", "report_failed")
    assert worker.metrics.registry.get_sample_value("conveyor_worker_reports_rejected_total") == 0
    stale = server.server.metrics.registry.get_sample_value(
        "conveyor_stale_completions_rejected_total"
    )
    assert stale == 0
