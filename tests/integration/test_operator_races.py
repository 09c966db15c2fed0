"""Bulk cancel and retry by filter while a real worker process runs the same tasks.

A worker process (8 slots) runs 600 short tasks; while it does, an operator cancels the type
by filter, retries the cancelled ones by filter, and cancels the type again. Checked: the
counts the bulk actions report are exact (against the history rows, the final states and
the outcome metric), every timeline is a legal sequence that ends in the task's state, and
every timeline reads forward in time.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from helpers import wait_for

from conveyor import BulkResult, Client, Task

TYPE = "sync_sleep"  # tests/worker_apps.py: sleeps float(payload) seconds
TASKS = 600


@dataclass
class Raced:
    server: Any
    ids: list[str]
    cancelled: BulkResult
    retried: BulkResult
    cancelled_again: BulkResult


@pytest.fixture
def raced(start_server, spawn_worker, db) -> Raced:
    server = start_server(
        heartbeat_interval=timedelta(milliseconds=200), lease_ttl=timedelta(seconds=5)
    )
    spawn_worker(server.address, concurrency=8)
    with Client(server.address) as client:
        ids = client.enqueue_tasks(
            [Task(type=TYPE, payload=b"0.02", max_retries=0) for _ in range(TASKS)]
        )
        wait_for(
            lambda: (
                db.fetchval(
                    "SELECT count(*) FROM conveyor_tasks WHERE type = $1 AND state = 'succeeded'",
                    TYPE,
                )
                >= 30
            ),
            timeout=60,
            what="the worker to run tasks",
        )
        cancelled = client.cancel_tasks(type=TYPE, reason="race one")
        succeeded = db.fetchval(
            "SELECT count(*) FROM conveyor_tasks WHERE type = $1 AND state = 'succeeded'", TYPE
        )
        retried = client.retry_tasks(type=TYPE, states="cancelled", reason="race two")
        # Cancel again while the worker is mid-way through the retried tasks.
        wait_for(
            lambda: (
                db.fetchval(
                    "SELECT count(*) FROM conveyor_tasks WHERE type = $1 AND state = 'succeeded'",
                    TYPE,
                )
                >= succeeded + 20
            ),
            timeout=60,
            what="the worker to run some of the retried tasks",
        )
        cancelled_again = client.cancel_tasks(type=TYPE, reason="race three")
        wait_for(
            lambda: (
                not db.fetchval(
                    "SELECT count(*) FROM conveyor_tasks WHERE type = $1 "
                    "AND state IN ('queued', 'scheduled', 'running')",
                    TYPE,
                )
            ),
            timeout=60,
            what="every task to settle",
        )
    return Raced(server, ids, cancelled, retried, cancelled_again)


def _histories(db, ids: list[str]) -> dict[str, list[Any]]:
    rows = db.fetch(
        "SELECT task_id::text AS task_id, id, event, state::text AS state, at "
        "FROM conveyor_task_history WHERE task_id = ANY($1::uuid[]) ORDER BY task_id, id",
        ids,
    )
    by_task: dict[str, list[Any]] = {}
    for row in rows:
        by_task.setdefault(row["task_id"], []).append(row)
    return by_task


def test_bulk_counts_are_exact_and_timelines_are_legal(raced: Raced, db) -> None:
    per_detail = {
        row["detail"]: row["count"]
        for row in db.fetch(
            "SELECT detail, count(*) FROM conveyor_task_events "
            "WHERE event IN ('cancelled', 'retried') GROUP BY detail"
        )
    }
    states = Counter(
        row["state"]
        for row in db.fetch("SELECT state::text FROM conveyor_tasks WHERE type = $1", TYPE)
    )
    assert per_detail.get("race one", 0) == raced.cancelled.changed
    assert per_detail.get("race two", 0) == raced.retried.changed
    assert per_detail.get("race three", 0) == raced.cancelled_again.changed
    assert states["cancelled"] == raced.cancelled_again.changed, states
    assert states["cancelled"] + states["succeeded"] == TASKS, states

    for task_id, rows in _histories(db, raced.ids).items():
        live = True
        for row in rows:
            if row["event"] == "cancelled":
                assert live, (task_id, [tuple(r) for r in rows])
                live = False
            elif row["event"] == "retried":
                assert not live, (task_id, [tuple(r) for r in rows])
                live = True
            else:
                assert live, (task_id, [tuple(r) for r in rows])
        final = db.fetchval("SELECT state::text FROM conveyor_tasks WHERE id = $1::uuid", task_id)
        assert rows[-1]["event"] == final, (task_id, [tuple(r) for r in rows])

    registry = raced.server.server.metrics.registry

    def outcome(name: str) -> float:
        return (
            registry.get_sample_value(
                "conveyor_task_outcomes_total", {"type": TYPE, "outcome": name}
            )
            or 0.0
        )

    assert outcome("cancelled") == raced.cancelled.changed + raced.cancelled_again.changed
    assert outcome("succeeded") == states["succeeded"]


def test_timelines_read_forward_in_time(raced: Raced, db) -> None:
    """A task's timeline, in the order every reader gets it (GetTask, `tasks show`, the
    dashboard: by event id), must not go back in time, and a cancelled task must not have
    finished before it started. A bulk cancel stamped its events and `finished_at` with its
    transaction's start (now()), taken before it listed the tasks: a task claimed in between
    was shown cancelled before it started."""
    backwards = []
    for task_id, rows in _histories(db, raced.ids).items():
        for before, after in itertools.pairwise(rows):
            if before["at"] > after["at"]:
                backwards.append(
                    (task_id, [(r["event"], r["at"].isoformat()) for r in (before, after)])
                )
    finished_before_started = db.fetch(
        "SELECT id::text, started_at, finished_at FROM conveyor_tasks "
        "WHERE type = $1 AND state = 'cancelled' AND finished_at < started_at",
        TYPE,
    )
    assert not backwards, f"{len(backwards)} timeline(s) go back in time, e.g. {backwards[:3]}"
    assert not finished_before_started, finished_before_started[:3]
