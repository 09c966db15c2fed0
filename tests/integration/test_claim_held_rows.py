"""A claim that finds its type's ready tasks held by another claim tries again soon.

A worker serving several types locks up to its batch of candidates per type for the length
of its claim statement and keeps the oldest overall, so beside a backlog of another type it
holds the head of a type it will not take (architecture.md, "Claiming"). A worker kept for
that one type then finds only held rows: its claim comes back empty though a task is ready.
It used to wait a poll interval (1 s) for a wake-up that had already come, and could meet a
held row again; now the claim says its rows were held, and the poll claims again at once.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from helpers import wait_for

from conveyor import Client, Task, Worker


def test_a_dedicated_worker_is_not_left_idle_by_a_generalists_held_rows(start_server, db):
    # A long poll interval keeps the failure (a specialist waiting one out) far from what a
    # loaded machine does to a healthy run: a CI run once saw a 0.54 s gap with 1 s polls.
    server = start_server(poll_interval=timedelta(seconds=3))
    lock = threading.Lock()
    started: dict[str, float] = {}
    ended: dict[str, float] = {}

    def backlog(ctx, payload):
        time.sleep(0.03)
        return b""

    def dedicated(ctx, payload):
        with lock:
            started[payload.decode()] = time.monotonic()
        time.sleep(0.2)
        with lock:
            ended[payload.decode()] = time.monotonic()
        return b""

    generalist = Worker(server.address, concurrency=64, worker_id="generalist")
    generalist.register_handler("held.backlog", backlog)
    generalist.register_handler("held.dedicated", dedicated)
    specialist = Worker(server.address, concurrency=1, worker_id="specialist")
    specialist.register_handler("held.dedicated", dedicated)
    gaps = []
    try:
        with Client(server.address) as client:
            for _ in range(25):
                client.enqueue_tasks([Task(type="held.backlog", payload=b"") for _ in range(1000)])
            specialist.start()
            generalist.start()
            wait_for(
                lambda: (
                    db.fetchval(
                        "SELECT count(*) FROM conveyor_tasks WHERE type = 'held.backlog'"
                        " AND state = 'succeeded'"
                    )
                    > 500
                ),
                timeout=30,
                what="the generalist draining its backlog",
            )
            for i in range(12):
                # Two at once: the first is handed to the idle specialist, the second waits
                # queued behind it and is claimed when the first ends (or by the generalist).
                first, second = f"x{i}", f"y{i}"
                client.enqueue_tasks(
                    [
                        Task(type="held.dedicated", payload=first.encode()),
                        Task(type="held.dedicated", payload=second.encode()),
                    ]
                )
                wait_for(
                    lambda pair=(first, second): all(name in ended for name in pair),
                    timeout=30,
                    what=f"{first} and {second} ending",
                )
                if started[second] >= ended[first]:  # it waited for the specialist's slot
                    gaps.append(started[second] - ended[first])
            left = db.fetchval(
                "SELECT count(*) FROM conveyor_tasks WHERE type = 'held.backlog'"
                " AND state = 'queued'"
            )
    finally:
        generalist.stop()
        specialist.stop()
    assert gaps, "no second task waited for the specialist"
    # A lone specialist starts its next task within milliseconds; a poll interval is 3 s.
    assert max(gaps) < 1.5, f"the specialist idled with a task ready: {sorted(gaps)}"
    assert left > 0, "the backlog ran out before the test ended: it measured nothing"
