"""Retention: the leader deletes finished tasks, with their history, once old enough.

Tasks are finished through the API (cancelled), then some are aged by moving their
finished_at back in the database (and the leader's queue-position marks with them); the
pruner must delete exactly those, with their history, and leave live tasks and recently
finished ones alone.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from datetime import timedelta

import pytest
from helpers import wait_for
from prometheus_client.parser import text_string_to_metric_families

from conveyor import Client, Task, TaskState
from conveyor.server.maintenance import retention

# Tasks that succeeded `finished_ago` and were enqueued an hour before, each with its
# started and succeeded events, as a busy queue leaves them.
SEED_FINISHED = """
WITH t AS (
  INSERT INTO conveyor_tasks (id, type, state, attempt, max_retries, timeout, created_at,
                              available_at, started_at, finished_at, payload)
  SELECT gen_random_uuid(), 'done.t', 'succeeded', 1, 3, interval '1 min',
         now() - $2::interval - interval '1 hour', now() - $2::interval - interval '1 hour',
         now() - $2::interval, now() - $2::interval, ''
  FROM generate_series(1, $1)
  RETURNING id
)
INSERT INTO conveyor_task_events (task_id, event, state, attempt)
SELECT id, e, 'succeeded', 1 FROM t CROSS JOIN unnest(ARRAY['started', 'succeeded']) AS e
"""


def pruned_metric(http_url: str, state: str) -> float | None:
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as response:  # noqa: S310
        body = response.read().decode()
    for family in text_string_to_metric_families(body):
        for found in family.samples:
            if found.name == "conveyor_tasks_pruned_total" and found.labels == {"state": state}:
                return found.value
    return None


def test_old_finished_tasks_are_pruned_with_their_history(start_server, db) -> None:
    server = start_server(
        retention=timedelta(hours=1), retention_interval=timedelta(milliseconds=200)
    )
    with Client(server.address) as client:
        finished = client.enqueue_tasks([Task(type="keep.t") for _ in range(6)])
        client.cancel_tasks(finished, reason="finished for the test")
        live = client.enqueue_tasks([Task(type="keep.t") for _ in range(2)])
        aged, recent = finished[:4], finished[4:]
        # Two hours pass for the aged tasks, and so for the queue-position marks the leader
        # records (a prune reaches only tasks enqueued before a mark older than its cutoff):
        # once a mark covers every task here, all the marks move back with the tasks.
        last_seq = db.fetchval("SELECT max(seq) FROM conveyor_tasks")
        wait_for(
            lambda: db.fetchval("SELECT max(seq) FROM conveyor_seq_marks") >= last_seq,
            what="the leader to mark the queue past these tasks",
        )
        db.execute(
            "UPDATE conveyor_seq_marks SET marked_at = marked_at - interval '2 hours' "
            "WHERE marked_at > '-infinity'"
        )
        db.execute(
            "UPDATE conveyor_tasks SET finished_at = now() - interval '2 hours' "
            "WHERE id = ANY($1::uuid[])",
            aged,
        )

        def remaining() -> set[str]:
            rows = db.fetch("SELECT id::text FROM conveyor_tasks WHERE type = 'keep.t'")
            return {row["id"] for row in rows}

        wait_for(lambda: remaining() == set(recent + live), what="the aged tasks to be pruned")
        assert (
            db.fetchval(
                "SELECT count(*) FROM conveyor_task_events WHERE task_id = ANY($1::uuid[])",
                aged,
            )
            == 0
        )
        assert {client.get_task_status(task_id).state for task_id in recent} == {
            TaskState.CANCELLED
        }
        assert {client.get_task_status(task_id).state for task_id in live} == {TaskState.QUEUED}
    assert pruned_metric(server.http_url, "cancelled") == 4
    # Of the marks older than the cutoff, only the one a prune uses is kept (and the seed
    # migration 0013 dated -infinity is gone with the others).
    wait_for(
        lambda: (
            db.fetchval(
                "SELECT count(*) FROM conveyor_seq_marks "
                "WHERE marked_at <= now() - interval '1 hour'"
            )
            == 1
        ),
        what="the leader to drop the marks no prune needs",
    )


def test_retention_is_on_by_default_and_can_be_turned_off(start_server) -> None:
    """Seven days unless told otherwise; retention=None runs no pruner at all."""
    default = start_server()
    assert [s.name for s in default.server.maintenance].count("retention") == 1
    assert default.server.config.retention == timedelta(days=7)
    kept = start_server(retention=None)
    assert "retention" not in [s.name for s in kept.server.maintenance]


@pytest.mark.slow  # about 14 s: the first round comes one 12 s interval after start
def test_a_backlog_larger_than_a_round_is_pruned_without_waiting_out_the_interval(
    start_server, db, caplog: pytest.LogCaptureFixture
) -> None:
    """A round deletes at most 20 batches of 1,000; after a round that ended full, the next
    one waited the whole retention interval (30 s), so retention deleted at most ~667
    tasks/s and a queue finishing more grew for ever, saying nothing. Now the next round
    follows at once, and the log says retention was behind and caught up."""
    per_round = retention.BATCH_SIZE * retention.MAX_BATCHES_PER_ROUND
    backlog = 2 * per_round + per_round // 2
    db.execute(SEED_FINISHED, backlog, timedelta(hours=2))
    interval = 12.0
    caplog.set_level(logging.INFO, logger="conveyor.server.retention")
    server = start_server(
        retention=timedelta(hours=1), retention_interval=timedelta(seconds=interval)
    )

    def left() -> int:
        return int(db.fetchval("SELECT count(*) FROM conveyor_tasks"))

    # The first round led by this server (within an interval of starting, if the election
    # came after the loop's first tick).
    wait_for(lambda: left() <= backlog - per_round, timeout=interval + 30, what="a round")
    first_round_done = time.monotonic()
    # Waiting out the interval, the other two rounds would need twice that.
    wait_for(lambda: left() == 0, timeout=interval * 0.75, what="the rest of the backlog")
    assert time.monotonic() - first_round_done < interval
    assert db.fetchval("SELECT count(*) FROM conveyor_task_events") == 0
    assert pruned_metric(server.http_url, "succeeded") == backlog
    events = [getattr(r, "event", None) for r in caplog.records]
    assert "retention_behind" in events
    wait_for(
        lambda: "retention_caught_up" in [getattr(r, "event", None) for r in caplog.records],
        what="the round that finds nothing left",
    )
    assert behind_metric(server.http_url) == 0


def behind_metric(http_url: str) -> float | None:
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as response:  # noqa: S310
        body = response.read().decode()
    for family in text_string_to_metric_families(body):
        for found in family.samples:
            if found.name == "conveyor_tasks_prune_behind_seconds":
                return found.value
    return None
