"""Atomic assignment: many worker processes competing for tasks never run one twice."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import wait_for

from conveyor import Client, Task

WORKERS = 4
CONCURRENCY = 8
PRODUCERS = 8
TASKS = 2_000
PER_PRODUCER = TASKS // PRODUCERS
BATCH = 25


def produce(address: str, index: int) -> list[str]:
    """Enqueue this producer's share with its own client: one by one, or in batches."""
    tasks = [Task(type="async_noop", payload=f"{index}-{n}".encode()) for n in range(PER_PRODUCER)]
    with Client(address) as client:
        if index % 2 == 0:
            return [client.enqueue_task(task) for task in tasks]
        ids: list[str] = []
        for start in range(0, len(tasks), BATCH):
            ids.extend(client.enqueue_tasks(tasks[start : start + BATCH]))
        return ids


@pytest.mark.slow
@pytest.mark.postgres_semantics  # SKIP LOCKED under competing claims
def test_every_task_runs_exactly_once_across_competing_workers(server, db, ledger, spawn_worker):
    """2,000 tasks from 8 producers, 4 worker processes x 8 slots: each task runs once."""
    workers = [
        spawn_worker(server.address, concurrency=CONCURRENCY, name=f"worker-{n}")
        for n in range(WORKERS)
    ]
    wait_for(
        lambda: (
            db.fetchval("SELECT count(*) FROM conveyor_workers WHERE state = 'active'") == WORKERS
        ),
        timeout=30,
        what="every worker to register",
    )

    with ThreadPoolExecutor(max_workers=PRODUCERS) as pool:
        futures = [pool.submit(produce, server.address, i) for i in range(PRODUCERS)]
        enqueued = [task_id for future in futures for task_id in future.result(timeout=120)]
    assert len(enqueued) == TASKS
    assert len(set(enqueued)) == TASKS

    wait_for(
        lambda: (
            db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'succeeded'") == TASKS
        ),
        timeout=120,
        interval=0.2,
        what=f"{TASKS} tasks to succeed",
    )
    assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == TASKS

    # The ledger (written by the handlers themselves): exactly one execution per task.
    started = ledger.started()
    assert len(started) == TASKS
    assert {row["task_id"] for row in started} == set(enqueued)
    assert {row["attempt"] for row in started} == {"1"}
    assert len({row["lease_id"] for row in started}) == TASKS
    assert len(ledger.finished()) == TASKS

    # The queue's history agrees: one 'started' event per task, none for anything else.
    started_events = Counter(
        row["task_id"]
        for row in db.fetch(
            "SELECT task_id::text FROM conveyor_task_events WHERE event = 'started'"
        )
    )
    assert set(started_events) == set(enqueued)
    assert set(started_events.values()) == {1}
    other = db.fetch(
        "SELECT event, count(*) AS n FROM conveyor_task_events"
        " WHERE event NOT IN ('enqueued', 'started', 'succeeded') GROUP BY event"
    )
    assert other == [], f"unexpected events: {[dict(row) for row in other]}"

    # The work really was shared between processes.
    pids = Counter(row["pid"] for row in started)
    assert len(pids) > 1, f"only one worker process ran tasks: {pids}"
    assert set(pids) <= {str(worker.pid) for worker in workers}
