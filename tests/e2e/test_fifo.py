"""FIFO: one worker process at concurrency 1 starts tasks in the order they were enqueued."""

from __future__ import annotations

import pytest
from helpers import wait_for

from conveyor import Client, Task, TaskState

TASKS = 30


def wait_registered(db, count: int = 1) -> None:
    wait_for(
        lambda: (
            db.fetchval("SELECT count(*) FROM conveyor_workers WHERE state = 'active'") >= count
        ),
        timeout=30,
        what=f"{count} worker(s) to register",
    )


def started_order(ledger) -> list[str]:
    return [row["task_id"] for row in ledger.started()]


def enqueue_one_by_one(client: Client) -> list[str]:
    return [client.enqueue_task(Task(type="noop", payload=str(i).encode())) for i in range(TASKS)]


@pytest.mark.slow
@pytest.mark.postgres_semantics  # the claim's order follows the planner's index use
class TestFifo:
    def test_backlog_runs_in_enqueue_order(self, server, client, db, ledger, spawn_worker):
        """30 tasks queued before any worker exists start in exactly their enqueue order."""
        ids = enqueue_one_by_one(client)
        assert all(client.get_task_status(i).state is TaskState.QUEUED for i in ids)

        worker = spawn_worker(server.address, concurrency=1, name="fifo-worker")
        wait_for(lambda: len(ledger.started()) >= TASKS, timeout=60, what="all tasks to start")
        wait_for(
            lambda: (
                db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'succeeded'")
                == TASKS
            ),
            timeout=30,
            what="all tasks to succeed",
        )

        assert started_order(ledger) == ids
        assert {row["pid"] for row in ledger.started()} == {str(worker.pid)}
        assert all(row["attempt"] == "1" for row in ledger.started())
        # The queue's own view agrees: started_at follows the enqueue order too.
        by_start = db.fetch("SELECT id::text FROM conveyor_tasks ORDER BY started_at, seq")
        assert [row["id"] for row in by_start] == ids

    def test_tasks_enqueued_while_the_worker_runs_start_in_order(
        self, server, client, db, ledger, spawn_worker
    ):
        """With the worker already leasing, tasks still start in their enqueue order."""
        worker = spawn_worker(server.address, concurrency=1, name="fifo-worker")
        wait_registered(db)

        ids = enqueue_one_by_one(client)
        wait_for(lambda: len(ledger.started()) >= TASKS, timeout=60, what="all tasks to start")
        wait_for(
            lambda: (
                db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'succeeded'")
                == TASKS
            ),
            timeout=30,
            what="all tasks to succeed",
        )

        assert started_order(ledger) == ids
        assert len(ledger.started()) == TASKS  # nothing ran twice
        assert {row["pid"] for row in ledger.started()} == {str(worker.pid)}
