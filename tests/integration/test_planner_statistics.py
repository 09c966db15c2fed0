"""The leader refreshes conveyor_tasks' planner statistics after a burst of enqueues.

Autovacuum refreshes them at most once a minute. Until then, a table its statistics call
empty makes the planner believe a type has one queued task, and the claim reads every
queued task of the type with a bitmap scan and sorts them instead of reading 64 off its
index in queue order (W1 with 150,000 tasks drained at 4,800 tasks/s instead of 10,000).
Real server, real PostgreSQL: 30,000 tasks inserted behind the server's back must be
analyzed by the leader within seconds, and the claim then plans an ordered index scan.
An ANALYZE that PostgreSQL skips (the table locked by another session, or a role that may
not analyze it) gathered nothing, and must be neither counted nor logged as one that ran.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from helpers import async_wait_for, with_user

from conveyor.server.maintenance import planner_statistics
from conveyor.server.maintenance.planner_statistics import (
    MAX_REFUSED_INTERVAL,
    MIN_ANALYZE_INTERVAL,
    MIN_CHANGED_ROWS,
    STALE_FRACTION,
    refused_interval,
    stale,
)
from conveyor.storage.queries import SQL

LOGGER = "conveyor.server.planner_statistics"
INSERT_BURST = (
    "INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries) "
    "SELECT gen_random_uuid(), 'burst', '', interval '60 seconds', 3 "
    "FROM generate_series(1, $1)"
)
TYPE_STATISTICS = (
    "SELECT most_common_vals::text FROM pg_stats "
    "WHERE tablename = 'conveyor_tasks' AND attname = 'type'"
)

BURST = 30_000

# Autovacuum's own ANALYZE may gather the statistics first (the burst is past its
# threshold), and the leader, finding them fresh, rightly runs none: the tests that need the
# leader's ANALYZE turn it off for the table (a CI run failed on it, PostgreSQL 18).
AUTOVACUUM_OFF = "ALTER TABLE conveyor_tasks SET (autovacuum_enabled = false)"
AUTOVACUUM_RESET = "ALTER TABLE conveyor_tasks RESET (autovacuum_enabled)"


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
    await conn.execute(AUTOVACUUM_OFF)
    try:
        assert (
            await conn.fetchval(
                "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'conveyor_tasks'"
            )
            is None
        )
        await conn.execute(INSERT_BURST, BURST)
        # The statistics themselves, not `last_analyze`: PostgreSQL reports the ANALYZE to
        # its activity statistics before the transaction that stores them commits, and a
        # plan made in between still sees the empty table's.
        await async_wait_for(
            lambda: conn.fetchval(TYPE_STATISTICS),
            timeout=15,
            what="the leader to ANALYZE conveyor_tasks",
        )
        assert (
            await conn.fetchval(
                "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'conveyor_tasks'"
            )
            is not None
        )
        # Counted once the statement has returned to the server, which may be a moment
        # after its statistics became visible here.
        analyzed = await async_wait_for(
            lambda: server.server.metrics.registry.get_sample_value(
                "conveyor_task_table_analyzed_total"
            ),
            timeout=5,
            what="the ANALYZE to be counted",
        )
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
        await conn.execute(AUTOVACUUM_RESET)
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


async def insert_burst(url: str) -> None:
    """BURST queued tasks, on a connection of their own: a backend that exits reports its
    changes to the cumulative statistics at once, where an idle one may wait 10 s."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(INSERT_BURST, BURST)
    finally:
        await conn.close()


def counted(server: Any, name: str, **labels: str) -> float:
    """A sample of the server's own metrics registry (0 when it has none yet)."""
    return server.server.metrics.registry.get_sample_value(name, labels) or 0.0


class MovedClock:
    """Stands in for the planner module's `time`: the real monotonic clock, moved on by hand.

    The planner reads it once a round, so its reads count the leader's rounds.
    """

    def __init__(self) -> None:
        self.moved = 0.0
        self.reads = 0

    def monotonic(self) -> float:
        self.reads += 1
        return time.monotonic() + self.moved

    async def rounds(self, count: int) -> None:
        """Wait until the planner has looked `count` more times."""
        until = self.reads + count
        await async_wait_for(lambda: self.reads >= until, timeout=10, what=f"{count} rounds")


def planner_messages(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


async def test_an_analyze_skipped_for_a_lock_is_counted_apart_and_tried_again_next_round(
    start_server: Any, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another session holds SHARE UPDATE EXCLUSIVE on conveyor_tasks (what VACUUM and
    autovacuum hold) while a burst of enqueues makes its statistics stale. ANALYZE
    (SKIP_LOCKED) then skips the table with only a WARNING: it used to be counted in
    conveyor_task_table_analyzed_total and logged as having gathered the statistics, and
    tried again only after MIN_ANALYZE_INTERVAL. Now each skip is counted as `locked`, and
    tried again at the next round; once the lock goes, the statistics are gathered at
    once."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server = start_server(reaper_interval=timedelta(milliseconds=100))
    conn = await asyncpg.connect(database_url)
    holder = await asyncpg.connect(database_url)
    # Autovacuum's own ANALYZE, were its minute to come round just as the lock goes, would
    # gather the statistics before the leader's next round, and the leader, finding them
    # fresh, would rightly run none: it did so once in CI (PostgreSQL 15).
    await conn.execute(AUTOVACUUM_OFF)
    try:
        held = holder.transaction()
        await held.start()
        try:
            await holder.execute("LOCK TABLE conveyor_tasks IN SHARE UPDATE EXCLUSIVE MODE")
            await insert_burst(database_url)
            locked = "conveyor_task_table_analyze_skipped_total"
            await async_wait_for(
                lambda: counted(server, locked, reason="locked") >= 1,
                timeout=15,
                what="the leader's ANALYZE to be skipped",
            )
            # Tried again at the next rounds, not after MIN_ANALYZE_INTERVAL.
            await async_wait_for(
                lambda: counted(server, locked, reason="locked") >= 3,
                timeout=MIN_ANALYZE_INTERVAL / 2,
                what="the skipped ANALYZE to be tried again at the next rounds",
            )
            assert counted(server, "conveyor_task_table_analyzed_total") == 0
            assert await conn.fetchval(TYPE_STATISTICS) is None
            while_locked = planner_messages(caplog)
        finally:
            await held.rollback()
        await async_wait_for(
            lambda: conn.fetchval(TYPE_STATISTICS),
            timeout=MIN_ANALYZE_INTERVAL / 2,
            what="the statistics to be gathered once the lock is gone",
        )
        await async_wait_for(
            lambda: counted(server, "conveyor_task_table_analyzed_total") == 1,
            timeout=5,
            what="the ANALYZE that ran to be counted",
        )
    finally:
        await conn.execute(AUTOVACUUM_RESET)
        await holder.close()
        await conn.close()

    assert counted(server, locked, reason="refused") == 0
    assert not [m for _, m in while_locked if m.startswith("gathered")], while_locked
    # The first skip is told (INFO), the retries at every round only at DEBUG.
    told = [m for level, m in while_locked if level >= logging.INFO]
    assert len(told) == 1, while_locked
    assert told[0].startswith("could not gather the task table's planner statistics yet"), told
    assert "lock not available" in told[0], told
    gathered = [m for _, m in planner_messages(caplog) if m.startswith("gathered")]
    assert len(gathered) == 1, gathered
    assert "attempt(s) skipped for a lock" in gathered[0], gathered


async def test_an_analyze_the_role_may_not_run_is_counted_as_refused(
    start_server: Any,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server whose role may read and write the tables but does not own conveyor_tasks:
    its ANALYZE is skipped with a WARNING ("permission denied to analyze", or "only table
    or database owner can analyze it" before PostgreSQL 17) and gathers nothing. It used to
    be counted and logged as gathered; now it is `refused`, with PostgreSQL's warning. It
    also used to be tried, and warned of, every MIN_ANALYZE_INTERVAL forever: each refusal
    now doubles the wait (the planner's clock is moved on by hand rather than waited for)."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    clock = MovedClock()
    monkeypatch.setattr(planner_statistics, "time", clock)
    refused = "conveyor_task_table_analyze_skipped_total"
    role = f"conveyor_no_analyze_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'
        )
        await admin.execute(f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        # Autovacuum's own ANALYZE (it may, as the table's owner) would make the statistics
        # fresh between the two refusals, and the second would never be tried: it did so in
        # about one run in four, whenever its minute came round inside the test.
        await admin.execute(AUTOVACUUM_OFF)
        server = start_server(
            database_url=with_user(database_url, role),
            reaper_interval=timedelta(milliseconds=100),
        )
        try:
            await insert_burst(database_url)
            await async_wait_for(
                lambda: counted(server, refused, reason="refused") >= 1,
                timeout=15,
                what="the leader's ANALYZE to be refused",
            )
            # Not tried again after MIN_ANALYZE_INTERVAL (10 rounds of 100 ms observed)...
            clock.moved += MIN_ANALYZE_INTERVAL * 1.5
            await clock.rounds(10)
            assert counted(server, refused, reason="refused") == 1
            # ...but after twice that.
            clock.moved += MIN_ANALYZE_INTERVAL * 0.6
            await async_wait_for(
                lambda: counted(server, refused, reason="refused") >= 2,
                timeout=5,
                what="the refused ANALYZE to be tried again after twice the interval",
            )
            assert counted(server, "conveyor_task_table_analyzed_total") == 0
            assert await admin.fetchval(TYPE_STATISTICS) is None
        finally:
            server.stop()
    finally:
        await admin.execute(AUTOVACUUM_RESET)
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()

    messages = planner_messages(caplog)
    assert not [m for _, m in messages if m.startswith("gathered")], messages
    warned = [m for level, m in messages if level == logging.WARNING]
    assert len(warned) == 2, messages
    assert warned[0].startswith("could not gather the task table's planner statistics"), warned
    assert "analyze" in warned[0], warned
    assert warned[0].endswith("trying again in 20s"), warned
    assert warned[1].endswith("trying again in 40s"), warned
    assert refused_interval(MAX_REFUSED_INTERVAL * 0.75) == MAX_REFUSED_INTERVAL
