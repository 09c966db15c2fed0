"""Registering again, after the servers forgot a worker, costs none of its leases.

A worker silent for longer than the worker retention (a day) finds its row deleted: its
heartbeat is answered `unregistered`, and it registers again from inside the beat. That
registration used to be retried for the worker's whole start timeout (30 s) with each call
allowed the full call timeout (10 s), so a server slow to answer it held up the heartbeat
loop, and the leases of the tasks the worker was running expired and ran again. It is now
one attempt a beat, within a heartbeat's own deadline.

The slow answer is made the way PostgreSQL makes one: another session holds an uncommitted
row with the worker's id, so the server's registration waits on that key, while its
heartbeats (an update of a row no one can see yet) go through.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from helpers import holding, wait_final, wait_for

from conveyor import Client, Task, TaskContext, TaskState, Worker

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import ServerThread

# Long enough for a loaded machine (at 4 s a heartbeat's deadline, a quarter of it, was
# 1 s, and a CI run saw one beat time out and the lease expire), shorter than the 10 s the
# registration used to hold the beats for.
LEASE = timedelta(seconds=8)


def failed_registrations(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if getattr(r, "event", None) == "worker_reregister_failed")


def test_a_registration_held_up_costs_no_lease(
    start_server: Callable[..., ServerThread],
    database_url: str,
    db: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="conveyor")
    server = start_server(lease_ttl=LEASE, heartbeat_interval=timedelta(seconds=1))
    release = threading.Event()
    attempts: list[int] = []

    def held(ctx: TaskContext, payload: bytes) -> bytes:
        attempts.append(ctx.attempt)
        release.wait(60)
        return payload

    worker = Worker(server.address, concurrency=1)
    worker.register_handler("again.held", held)
    worker.start()
    try:
        with Client(server.address) as client:
            task_id = client.enqueue_task(Task(type="again.held"))
            wait_for(lambda: attempts, timeout=15, what="the task to start")
            worker_id = worker.worker_id
            db.execute("DELETE FROM conveyor_workers WHERE id = $1", worker_id)
            # The worker's own id, made by Worker: safe to paste.
            insert = (
                "INSERT INTO conveyor_workers (id, host, pid, task_types, concurrency, version) "  # noqa: S608
                f"VALUES ('{worker_id}', 'elsewhere', 1, '{{again.held}}', 1, 'test')"
            )
            with holding(database_url, insert):
                held_at = db.fetchval("SELECT now()")
                wait_for(
                    lambda: failed_registrations(caplog) >= 2,
                    timeout=LEASE.total_seconds() * 2,
                    what="two beats' registrations to give up",
                )
                # Renewed by a beat after them: before, the first registration alone held
                # the beats for 10 s, and the lease expired.
                wait_for(
                    lambda: (
                        db.task(task_id)["lease_expires_at"]
                        > held_at + LEASE + timedelta(seconds=2)
                    ),
                    timeout=LEASE.total_seconds(),
                    what="the lease to be renewed while the registration is held up",
                )
            # Registered again, once the key is free.
            wait_for(
                lambda: (
                    db.fetchval("SELECT host FROM conveyor_workers WHERE id = $1", worker_id)
                    not in (None, "elsewhere")
                ),
                timeout=LEASE.total_seconds() * 2,
                what="the worker to register again",
            )
            release.set()
            status = wait_final(client, task_id, timeout=30)
    finally:
        release.set()
        worker.stop()
    assert status.state is TaskState.SUCCEEDED
    assert attempts == [1]
    assert [row["event"] for row in db.events(task_id)] == ["enqueued", "started", "succeeded"]
