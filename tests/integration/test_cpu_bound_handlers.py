"""Dozens of CPU-bound plain def handlers leave the worker's heartbeats room.

Plain def handlers run on threads that share the GIL with the worker's event loop, which
sends the heartbeats. With Python's default switch interval, 64 handlers doing pure-Python
work kept the loop from the lock for over 10 s: a healthy worker went silent, was marked
lost, and its tasks ran again. The worker's handler threads now lower the interval
(worker/handler_threads.py); this runs 64 of them in a real worker process against a
server that calls a worker lost after 15 s of silence (heartbeats every 2 s), for 20 s of
burning, longer than that. The delays the GIL adds do not shrink with the interval: with
1 s and 5 s a loaded CI run saw one heartbeat 5 s apart from the last, where the default
interval lets none through at all; a more loaded one took the worker for lost after 10 s.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
from helpers import wait_final, wait_for

from conveyor import Client, Task, TaskState

HANDLERS = 64
BURN_SECONDS = 20


@pytest.mark.slow
def test_64_cpu_bound_handlers_keep_their_worker_alive(start_server, spawn_worker, ledger, db):
    server = start_server(
        heartbeat_interval=timedelta(seconds=2), worker_lost_after=timedelta(seconds=15)
    )
    spawn_worker(server.address, concurrency=HANDLERS)
    wait_for(
        lambda: db.fetchval("SELECT count(*) FROM conveyor_workers WHERE state = 'active'") == 1,
        what="the worker to register",
    )
    with Client(server.address) as client:
        ids = client.enqueue_tasks(
            [
                Task(type="burn", payload=str(BURN_SECONDS).encode(), timeout=120, max_retries=3)
                for _ in range(HANDLERS)
            ]
        )
        wait_for(
            lambda: len(ledger.started()) >= HANDLERS,
            timeout=30,
            what="every handler to start",
        )
        statuses = [wait_final(client, task_id, timeout=120) for task_id in ids]
    assert [status.state for status in statuses] == [TaskState.SUCCEEDED] * HANDLERS
    assert {status.attempts for status in statuses} == {1}
    starts = Counter(row["task_id"] for row in ledger.started())
    assert starts == Counter(ids), "a task ran more than once"
    assert db.fetchval("SELECT count(*) FROM conveyor_workers WHERE state = 'lost'") == 0
