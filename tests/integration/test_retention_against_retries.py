"""An operator retrying old failed tasks while retention deletes them.
Each task is either deleted with all its history, or retried (kept, queued, its history
whole): never retried and then deleted, never half deleted."""

from __future__ import annotations

import threading
from datetime import timedelta

from helpers import wait_for

from conveyor import Client
from conveyor.errors import TaskNotFound

SEED = """
WITH t AS (
  INSERT INTO conveyor_tasks (id, type, state, attempt, max_retries, timeout, created_at,
                              available_at, started_at, finished_at, worker_id, last_error, payload)
  SELECT gen_random_uuid(), 'old.f', 'failed', 4, 3, interval '1 min', now() - interval '3 days',
         now() - interval '3 days', now() - interval '2 days', now() - interval '2 days', 'w',
         'ValueError: x', ''
  FROM generate_series(1, $1)
  RETURNING id
)
INSERT INTO conveyor_task_events (task_id, event, state, attempt)
SELECT id, 'failed', 'failed', 4 FROM t
"""


def test_retry_racing_retention(start_server, db) -> None:
    db.execute(SEED, 6000)
    ids = [r["id"] for r in db.fetch("SELECT id::text AS id FROM conveyor_tasks ORDER BY seq")]
    # Retention off first: the operator is about to retry, then a leader with retention on.
    server = start_server(
        retention=timedelta(days=1), retention_interval=timedelta(milliseconds=100)
    )
    retried: set[str] = set()
    errors: list[BaseException] = []
    gone: set[str] = set()

    def operator() -> None:
        try:
            with Client(server.address) as client:
                for start in range(0, len(ids), 100):
                    chunk = ids[start : start + 100]
                    while chunk:
                        try:
                            result = client.retry_tasks(chunk, reason="again")
                        except TaskNotFound as exc:
                            # Deleted by retention meanwhile: the call changed nothing.
                            gone.add(exc.task_id)
                            chunk = [i for i in chunk if i != exc.task_id]
                            continue
                        retried.update(result.changed_ids)
                        break
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=operator)
    thread.start()
    thread.join(120)
    assert not errors, errors
    wait_for(
        lambda: (
            db.fetchval(
                "SELECT count(*) FROM conveyor_tasks WHERE type = 'old.f' AND state = 'failed'"
            )
            == 0
        ),
        timeout=60,
        what="the rest pruned",
    )
    left = {r["id"] for r in db.fetch("SELECT id::text AS id FROM conveyor_tasks")}
    assert retried <= left, len(retried - left)
    assert left <= retried
    orphans = db.fetchval(
        "SELECT count(*) FROM conveyor_task_events e WHERE NOT EXISTS "
        "(SELECT FROM conveyor_tasks t WHERE t.id = e.task_id)"
    )
    assert orphans == 0
    # Each retried task keeps its old history and its `retried` event.
    counts = {
        r["n"] for r in db.fetch("SELECT count(*) AS n FROM conveyor_task_events GROUP BY task_id")
    }
    assert counts <= {2}, counts
