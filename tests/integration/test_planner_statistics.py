"""The leader refreshes conveyor_tasks' planner statistics after a burst of enqueues.

Autovacuum refreshes them at most once a minute. Until then, a table its statistics call
empty makes the planner believe a type has one queued task, and the claim reads every
queued task of the type with a bitmap scan and sorts them instead of reading 64 off its
index in queue order (W1 with 150,000 tasks drained at 4,800 tasks/s instead of 10,000).
Real server, real PostgreSQL: 30,000 tasks inserted behind the server's back must be
analyzed by the leader within seconds, and the claim then plans an ordered index scan.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from helpers import async_wait_for

from conveyor.server.maintenance.planner_statistics import (
    MIN_CHANGED_ROWS,
    STALE_FRACTION,
    stale,
)
from conveyor.storage.queries import SQL

BURST = 30_000


def plan_nodes(node: Any) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan."""
    nodes = [node]
    for child in node.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


async def test_a_burst_of_enqueues_is_analyzed_and_the_claim_reads_its_index(
    start_server: Any, database_url: str
) -> None:
    server = start_server(reaper_interval=timedelta(milliseconds=100))
    conn = await asyncpg.connect(database_url)
    try:
        assert (
            await conn.fetchval(
                "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'conveyor_tasks'"
            )
            is None
        )
        await conn.execute(
            "INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries) "
            "SELECT gen_random_uuid(), 'burst', '', interval '60 seconds', 3 "
            "FROM generate_series(1, $1)",
            BURST,
        )
        # The statistics themselves, not `last_analyze`: PostgreSQL reports the ANALYZE to
        # its activity statistics before the transaction that stores them commits, and a
        # plan made in between still sees the empty table's.
        await async_wait_for(
            lambda: conn.fetchval(
                "SELECT most_common_vals::text FROM pg_stats "
                "WHERE tablename = 'conveyor_tasks' AND attname = 'type'"
            ),
            timeout=15,
            what="the leader to ANALYZE conveyor_tasks",
        )
        assert (
            await conn.fetchval(
                "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'conveyor_tasks'"
            )
            is not None
        )
        analyzed = server.server.metrics.registry.get_sample_value(
            "conveyor_task_table_analyzed_total"
        )
        assert analyzed is not None
        assert analyzed >= 1
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            raw = await conn.fetchval(
                "EXPLAIN (FORMAT JSON) " + SQL["task_claim"],
                ["burst", "quiet"],
                64,
                "worker-1",
                30.0,
                10.0,
                16 * 1024 * 1024,
                1024,
            )
        finally:
            await transaction.rollback()
        nodes = plan_nodes(json.loads(raw)[0]["Plan"])
        listed = json.dumps(json.loads(raw), indent=1)
        assert not [n for n in nodes if n["Node Type"].startswith("Bitmap")], listed
        assert any(n.get("Index Name") == "conveyor_tasks_type_state_seq_idx" for n in nodes), (
            listed
        )
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("changed", "analyzed_rows", "expected"),
    [
        (MIN_CHANGED_ROWS - 1, 0, False),  # a handful of tasks never changes a plan
        (MIN_CHANGED_ROWS, 0, True),  # a burst into a table analyzed empty
        (int(STALE_FRACTION * 1_000_000) - 1, 1_000_000, False),  # a fifth is the bar
        (int(STALE_FRACTION * 1_000_000), 1_000_000, True),
    ],
)
def test_statistics_are_stale_after_a_fifth_of_the_rows_changed(
    changed: int, analyzed_rows: int, expected: bool
) -> None:
    assert stale(changed, analyzed_rows) is expected
