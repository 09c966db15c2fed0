"""Every per-task query is served by an index, never by a sequential scan of a big table.

A database with 20,000 tasks (mostly finished, a small backlog and a few running) and their
history is analysed once; each query of `conveyor.storage.queries.SQL` that touches one task
(or the backlog, or the expired leases) is then EXPLAINed with realistic parameters inside a
transaction that is rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from helpers import run_sql, with_database

from conveyor.storage import queries
from conveyor.storage.queries import FIRST_PAGE, SQL
from conveyor.types import TaskState

ALL_STATES = [state.value for state in TaskState]
REPLY_BYTES = 16 * 1024 * 1024

BIG_TABLES = frozenset({"conveyor_tasks", "conveyor_task_events"})

SEED_TASKS = """
INSERT INTO conveyor_tasks (
    id, type, state, attempt, max_retries, timeout, created_at, available_at, started_at,
    finished_at, worker_id, lease_id, lease_expires_at, deadline_at, payload, result
)
SELECT
    gen_random_uuid(),
    CASE WHEN (g / 7) % 2 = 0 THEN 'a' ELSE 'b' END,
    CASE WHEN g % 100 = 0 THEN 'queued'
         WHEN g % 400 = 1 THEN 'running'
         ELSE 'succeeded' END::conveyor_task_state,
    CASE WHEN g % 100 = 0 THEN 0 ELSE 1 END,
    3,
    interval '60 seconds',
    now() - interval '2 hours' + g * interval '100 milliseconds',
    now() - interval '2 hours' + g * interval '100 milliseconds',
    CASE WHEN g % 100 <> 0 THEN now() - interval '1 hour' END,
    CASE WHEN g % 100 <> 0 AND g % 400 <> 1 THEN now() - interval '59 minutes' END,
    CASE WHEN g % 100 <> 0 THEN 'worker-' || (g % 8) END,
    CASE WHEN g % 400 = 1 THEN gen_random_uuid() END,
    -- Half of the running tasks' leases have already expired.
    CASE WHEN g % 800 = 1 THEN now() - interval '5 seconds'
         WHEN g % 400 = 1 THEN now() + interval '30 seconds' END,
    CASE WHEN g % 400 = 1 THEN now() + interval '1 minute' END,
    convert_to('payload ' || g, 'UTF8'),
    CASE WHEN g % 100 <> 0 AND g % 400 <> 1 THEN convert_to('result ' || g, 'UTF8') END
FROM generate_series(1, 20000) AS g
"""

SEED_EVENTS = """
INSERT INTO conveyor_task_events (task_id, at, event, state, attempt, worker_id)
SELECT t.id, t.created_at + e.n * interval '1 second',
       (ARRAY['enqueued', 'started', 'succeeded'])[e.n + 1],
       (ARRAY['queued', 'running', 'succeeded'])[e.n + 1]::conveyor_task_state,
       least(e.n, 1), t.worker_id
FROM conveyor_tasks AS t
CROSS JOIN generate_series(1, 2) AS e (n)
WHERE t.state <> 'queued'
"""


@dataclass(frozen=True)
class Seeded:
    """The seeded database and a few of its rows to use as parameters."""

    url: str
    queued_id: uuid.UUID
    running_id: uuid.UUID
    running_lease_id: uuid.UUID
    succeeded_id: uuid.UUID


@pytest.fixture(scope="module")
def seeded(pg_cluster) -> Iterator[Seeded]:
    """One migrated database with 20,000 tasks and their history, analysed (module-wide)."""
    statements = (SEED_TASKS, SEED_EVENTS, "ANALYZE conveyor_tasks", "ANALYZE conveyor_task_events")
    with seeded_database(pg_cluster, "plans", *statements) as url:

        async def check(conn: Any) -> None:
            counts = {
                row["state"]: row["n"]
                for row in await conn.fetch(
                    "SELECT state::text, count(*) AS n FROM conveyor_tasks GROUP BY state"
                )
            }
            assert counts == {"succeeded": 19750, "queued": 200, "running": 50}

        yield asyncio.run(pick_tasks(url, check=check))


async def pick_tasks(
    url: str, *, check: Callable[[Any], Awaitable[None]] | None = None, live_lease: str = ""
) -> Seeded:
    """One task of each state of a seeded database, after `check(conn)` if given.

    `live_lease`: " AND lease_expires_at > now()" to pick a running task with a live lease.
    """
    conn = await asyncpg.connect(url)
    try:
        if check is not None:
            await check(conn)
        queued = await conn.fetchval("SELECT id FROM conveyor_tasks WHERE state = 'queued' LIMIT 1")
        running = await conn.fetchrow(
            "SELECT id, lease_id FROM conveyor_tasks WHERE state = 'running'"  # noqa: S608
            f"{live_lease} LIMIT 1"
        )
        succeeded = await conn.fetchval(
            "SELECT id FROM conveyor_tasks WHERE state = 'succeeded' LIMIT 1"
        )
    finally:
        await conn.close()
    return Seeded(url, queued, running["id"], running["lease_id"], succeeded)


def plan_nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every plan node under `node` (a plan, a list of plans, or EXPLAIN's JSON document)."""
    if isinstance(node, list):
        for item in node:
            yield from plan_nodes(item)
    elif isinstance(node, dict):
        if "Node Type" in node:
            yield node
        for key in ("Plan", "Plans"):
            if key in node:
                yield from plan_nodes(node[key])


def seq_scans_on_big_tables(plan: Any) -> list[str]:
    """The big tables a plan reads with a sequential scan."""
    return [
        node.get("Relation Name", "?")
        for node in plan_nodes(plan)
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in BIG_TABLES
    ]


def indexes_used(plan: Any) -> set[str]:
    """Names of every index a plan scans."""
    return {node["Index Name"] for node in plan_nodes(plan) if "Index Name" in node}


def assert_tasks_read_by_primary_key(plan: Any) -> None:
    """`plan` reads conveyor_tasks, and only through its primary key (one probe per task)."""
    scans = [n for n in plan_nodes(plan) if n.get("Relation Name") == "conveyor_tasks"]
    assert scans, json.dumps(plan, indent=1)
    assert {n.get("Index Name") for n in scans if n["Node Type"] != "ModifyTable"} == {
        "conveyor_tasks_pkey"
    }, json.dumps(plan, indent=1)


def sql_literal(value: Any) -> str:
    """`value` as a quoted SQL literal PostgreSQL reads as whatever type it is used as."""
    if value is None:
        return "NULL"
    return "'" + _text(value, in_array=False).replace("'", "''") + "'"


def _text(value: Any, *, in_array: bool) -> str:
    if isinstance(value, list | tuple):
        return "{" + ",".join(_text(item, in_array=True) for item in value) + "}"
    if value is None:
        return "NULL"
    if isinstance(value, bytes | bytearray):
        text = "\\x" + bytes(value).hex()
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    if not in_array:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def explain(
    url: str,
    sql: str,
    *args: Any,
    before: str | None = None,
    plan_mode: str | None = None,
    analyze: bool = False,
) -> Any:
    """EXPLAIN (FORMAT JSON) `sql` with `args`, in a transaction that is rolled back.

    `analyze` runs it (EXPLAIN ANALYZE), for the rows each node read.

    `before` is a statement run first in the same transaction (and rolled back with it).
    `plan_mode` is a `plan_cache_mode`: with `force_generic_plan` the statement is PREPAREd
    and its EXECUTE explained, since a statement EXPLAINed with bound parameters is always
    planned for their values (the parameters are folded in, whatever `plan_cache_mode`
    says); the server's statements are prepared, so after five runs PostgreSQL may plan
    them without their values.
    """
    conn = await asyncpg.connect(url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        try:
            if before is not None:
                await conn.execute(before)
            if plan_mode is not None:
                await conn.execute(f"SET LOCAL plan_cache_mode = {plan_mode}")
            if plan_mode == "force_generic_plan":
                # EXECUTE takes no bound parameters: its arguments are written out, as
                # literals of unknown type that PostgreSQL reads as the parameters' types.
                await conn.execute(f"PREPARE explained AS {sql}")
                values = ", ".join(map(sql_literal, args))
                raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE explained({values})")
            else:
                options = "ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON"
                raw = await conn.fetchval(f"EXPLAIN ({options}) " + sql, *args)
        finally:
            await transaction.rollback()
    finally:
        await conn.close()
    return json.loads(raw) if isinstance(raw, str) else raw


def parameters(seeded: Seeded) -> dict[str, tuple[Any, ...]]:
    """Realistic parameters for each per-task query (see the casts in queries.sql)."""
    running, lease = seeded.running_id, seeded.running_lease_id
    return {
        # Bounded by a reply's bytes, as the server claims (16 MiB, 1 KiB a lease).
        "task_claim": (["a", "b"], 10, "worker-1", 30.0, 10.0, REPLY_BYTES, 1024),
        # Two new tasks, the first offered to a waiting worker (the FIFO probe per type).
        "task_insert_leasing": (
            [str(uuid.uuid4()), str(uuid.uuid4())],
            ["a", "b"],
            [b"payload"],
            [60.0],
            [3],
            [None],
            ["worker-1", None],
            30.0,
            10.0,
            [str(uuid.uuid4()), None],
        ),
        "task_get": (seeded.succeeded_id,),
        "task_event_list": (seeded.succeeded_id, 100, 512 * 1024, None),
        "task_succeed": (running, lease, b"result", "worker-1"),
        "task_succeed_many": ([running], [lease], [b"result"], [True], ["worker-1"]),
        "task_fail": (
            *(running, lease, "ValueError: boom", "failed", True, 1.0, 300.0, "worker-1"),
        ),
        "task_release": (running, lease, "handed back", "worker-1", True, 1000),
        "task_cancel": (seeded.queued_id, "cancelled while queued", "ops (token 6f0c3b1a)"),
        "task_lease_extend": ([running], [lease], 30.0, 10.0, ["50%"], "worker-1"),
        "task_reap_expired": (500, 1.0, 300.0, "server-1", 1),
        "task_lock_for_cancel": (seeded.queued_id,),
        "worker_sweep_lost": (15.0, "server-1", 1, 3600.0),
        "task_live_stats": (1000, ["a"]),
        "task_explain": (seeded.queued_id, 15.0),
        "task_list_by_state": (["failed", "succeeded"], FIRST_PAGE, 51),
        "task_list_by_type_and_state": (list(ALL_STATES), FIRST_PAGE, 51, "a"),
        "task_count_by_state": (["failed", "cancelled"],),
        "task_count_by_type_and_state": (["failed", "cancelled"], "b"),
        "task_states_get": ([seeded.queued_id, seeded.succeeded_id],),
        "task_briefs_get": ([seeded.queued_id, running],),
        "task_retry_many": (
            [seeded.succeeded_id],
            "retried by an operator",
            ["failed"],
            "ops (token 6f0c3b1a)",
        ),
        "task_cancel_many": (
            [seeded.queued_id, running],
            "cancelled by an operator",
            ["queued", "running"],
            "ops (token 6f0c3b1a)",
        ),
        "task_list_oldest_by_state": (["queued", "running"], 0, FIRST_PAGE, 500),
        "task_list_oldest_by_type_and_state": (["queued"], 100, FIRST_PAGE, 500, "b"),
        "task_seq_last": (),
        "task_payload_get": (seeded.succeeded_id,),
        "task_payload_head": (seeded.succeeded_id, 2000),
        "task_prune_finished": (1800.0, 1000, "server-1", 1, 90.0, [0, 0, 0], 10_000),
        "task_event_buckets": (datetime.now(UTC) - timedelta(seconds=20), 5.0),
        "task_promote_due": (1000,),
    }


PER_TASK_QUERIES = [
    "task_claim",
    "task_insert_leasing",
    "task_get",
    "task_event_list",
    "task_succeed",
    "task_succeed_many",
    "task_fail",
    "task_release",
    "task_cancel",
    "task_lease_extend",
    "task_reap_expired",
    "task_lock_for_cancel",
    "worker_sweep_lost",
    "task_live_stats",
    "task_explain",
    "task_list_by_state",
    "task_list_by_type_and_state",
    "task_count_by_state",
    "task_count_by_type_and_state",
    "task_states_get",
    "task_briefs_get",
    "task_retry_many",
    "task_cancel_many",
    "task_list_oldest_by_state",
    "task_list_oldest_by_type_and_state",
    "task_payload_get",
    "task_payload_head",
    "task_prune_finished",
    "task_event_buckets",
    "task_promote_due",
]


class TestPlanWalker:
    async def test_walker_finds_a_seq_scan_when_there_is_one(self, seeded: Seeded) -> None:
        """A query no index can serve is reported, so the checks below are able to fail."""
        plan = await explain(
            seeded.url, "SELECT id FROM conveyor_tasks WHERE payload = $1", b"payload 7"
        )
        assert seq_scans_on_big_tables(plan) == ["conveyor_tasks"]

    async def test_walker_finds_nested_nodes_and_index_names(self, seeded: Seeded) -> None:
        """The walker reaches nodes under CTEs and subplans and collects their index names."""
        plan = await explain(
            seeded.url,
            "WITH x AS (SELECT id FROM conveyor_tasks WHERE id = $1) "
            "SELECT * FROM conveyor_task_events WHERE task_id IN (SELECT id FROM x)",
            seeded.succeeded_id,
        )
        assert {"conveyor_tasks_pkey", "conveyor_task_events_pkey"} <= indexes_used(plan)
        assert len(list(plan_nodes(plan))) >= 3

    async def test_claim_without_its_index_is_caught(self, seeded: Seeded) -> None:
        """With every index on state dropped (rolled back), task_claim is flagged."""
        plan = await explain(
            seeded.url,
            SQL["task_claim"],
            *parameters(seeded)["task_claim"],
            before="DROP INDEX conveyor_tasks_state_seq_idx, conveyor_tasks_type_state_seq_idx",
        )
        assert "conveyor_tasks_type_state_seq_idx" not in indexes_used(plan)
        assert "conveyor_tasks" in seq_scans_on_big_tables(plan)


class TestPerTaskQueriesUseIndexes:
    def test_every_per_task_query_is_checked(self) -> None:
        """The queries checked here exist in queries.sql under these names."""
        assert set(PER_TASK_QUERIES) <= set(SQL)

    @pytest.mark.parametrize("name", PER_TASK_QUERIES)
    async def test_no_sequential_scan_of_a_big_table(self, seeded: Seeded, name: str) -> None:
        """The query's plan reads conveyor_tasks and conveyor_task_events only through indexes."""
        plan = await explain(seeded.url, SQL[name], *parameters(seeded)[name])
        assert seq_scans_on_big_tables(plan) == [], json.dumps(plan, indent=1)
        assert indexes_used(plan), json.dumps(plan, indent=1)


@contextlib.contextmanager
def seeded_database(pg_cluster: Any, name: str, *statements: str) -> Iterator[str]:
    """A migrated database of its own, after `statements`; dropped afterwards."""
    name = f"conveyor_{name}_{uuid.uuid4().hex[:12]}"
    run_sql(pg_cluster.admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{pg_cluster.template}"')
    url = with_database(pg_cluster.admin_url, name)
    try:
        run_sql(url, *statements)
        yield url
    finally:
        with contextlib.suppress(Exception):
            run_sql(pg_cluster.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def backlog(
    pg_cluster: Any, name: str, tasks_by_type: dict[str, int]
) -> contextlib.AbstractContextManager[str]:
    """A migrated database holding `tasks_by_type` queued tasks, analysed; dropped after."""
    return seeded_database(
        pg_cluster,
        name,
        *(
            "INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries) "  # noqa: S608 - test constants
            f"SELECT gen_random_uuid(), '{task_type}', '', interval '60 seconds', 3 "
            f"FROM generate_series(1, {count})"
            for task_type, count in tasks_by_type.items()
        ),
        "ANALYZE conveyor_tasks",
    )


@pytest.fixture(scope="module")
def skewed(pg_cluster) -> Iterator[str]:
    """A backlog of 50,000 tasks of one type and 5 of another, analysed: the shape in which
    a planner guessing "half the queued rows are of the wanted type" would walk the whole
    backlog through (state, seq) instead of probing (type, state, seq)."""
    with backlog(pg_cluster, "skew", {"bulk": 50_000, "rare": 5}) as url:
        yield url


@pytest.fixture(scope="module")
def one_type(pg_cluster) -> Iterator[str]:
    """A backlog of 50,000 tasks of a single type, analysed: the statistics then say every
    task is of that type (one distinct value), so without migration 0011's n_distinct a
    claim for any type was estimated to match every queued row, and the planner walked
    (state, seq) with a filter on the type: 130-170 ms per claim at a million queued for a
    worker that also serves a type with no task (W4, eighth round)."""
    with backlog(pg_cluster, "one_type", {"bulk": 50_000}) as url:
        yield url


class TestClaimUnderASkewedBacklog:
    # No bound, a reply's bytes, and a bound the oldest task alone passes: the bound is
    # applied to the candidates the index gave, and must not change how they are found.
    @pytest.mark.parametrize("max_bytes", [None, REPLY_BYTES, 1])
    @pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
    @pytest.mark.parametrize(
        ("backlog", "wanted"),
        [
            ("skewed", ["rare"]),
            ("skewed", ["absent"]),
            ("skewed", ["rare", "bulk"]),
            ("one_type", ["absent"]),
            ("one_type", ["bulk", "absent"]),
        ],
    )
    async def test_the_claim_probes_its_index_whatever_the_backlog(
        self,
        skewed: str,
        one_type: str,
        backlog: str,
        plan_mode: str,
        wanted: list[str],
        max_bytes: int | None,
    ) -> None:
        """A worker for a quiet type never scans the busy type's backlog, in the custom plan
        and in the generic plan asyncpg's prepared statements may switch to."""
        plan = await explain(
            {"skewed": skewed, "one_type": one_type}[backlog],
            SQL["task_claim"],
            wanted,
            10,
            "worker-1",
            30.0,
            10.0,
            max_bytes,
            1024,
            plan_mode=plan_mode,
        )
        used = indexes_used(plan)
        assert "conveyor_tasks_type_state_seq_idx" in used, json.dumps(plan, indent=1)
        assert "conveyor_tasks_state_seq_idx" not in used, json.dumps(plan, indent=1)


SEED_RUNNING = """
INSERT INTO conveyor_tasks (
    id, type, state, attempt, max_retries, timeout, started_at, finished_at, worker_id,
    lease_id, lease_expires_at, deadline_at, payload
)
SELECT
    gen_random_uuid(), 't',
    CASE WHEN g % 20 = 0 THEN 'running' ELSE 'succeeded' END::conveyor_task_state,
    1, 3, interval '60 seconds', now(),
    CASE WHEN g % 20 <> 0 THEN now() END,
    'worker-' || (g % 8),
    CASE WHEN g % 20 = 0 THEN gen_random_uuid() END,
    CASE WHEN g % 20 = 0 THEN now() + interval '30 seconds' END,
    CASE WHEN g % 20 = 0 THEN now() + interval '1 minute' END,
    ''::bytea
FROM generate_series(1, 100000) AS g
"""


@pytest.fixture(scope="module")
def many_running(pg_cluster) -> Iterator[str]:
    """100,000 tasks of which 5,000 are running, across 8 workers, analysed: a large fleet
    busy with long tasks, in which every report batch and heartbeat names a few of them."""
    with seeded_database(pg_cluster, "running", SEED_RUNNING, "ANALYZE conveyor_tasks") as url:
        yield url


async def worker_4_leases(conn: asyncpg.Connection, count: int) -> list[asyncpg.Record]:
    """`count` of the running tasks (id, lease_id) that `many_running` gives worker-4."""
    return list(
        await conn.fetch(
            "SELECT id, lease_id FROM conveyor_tasks "
            "WHERE state = 'running' AND worker_id = 'worker-4' LIMIT $1",
            count,
        )
    )


def report_arguments(name: str, leases: list[Any], worker_id: str) -> tuple[Any, ...]:
    """The parameters of a report batch (`task_succeed_many`) or a heartbeat
    (`task_lease_extend`) naming `leases` (rows of id and lease_id) for `worker_id`."""
    count = len(leases)
    ids, lease_ids = [row["id"] for row in leases], [row["lease_id"] for row in leases]
    if name == "task_succeed_many":
        return (ids, lease_ids, [None] * count, [False] * count, [worker_id] * count)
    return (ids, lease_ids, 30.0, 10.0, [None] * count, worker_id)


class TestBatchesByTask:
    @pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
    @pytest.mark.parametrize("count", [1, 64, 100, 500])
    @pytest.mark.parametrize("name", ["task_succeed_many", "task_lease_extend"])
    async def test_a_batch_probes_each_task_not_every_running_one(
        self, many_running: str, name: str, count: int, plan_mode: str
    ) -> None:
        """A batch of reports or heartbeats reads each named task through the primary key.
        As a join, the planner chose, from about 70 tasks up, to read all 5,000 running tasks
        through the reaper's index and hash them (5-7 ms for 100 reports against 2-3)."""
        conn = await asyncpg.connect(many_running)
        try:
            leases = await worker_4_leases(conn, count)
        finally:
            await conn.close()
        assert len(leases) == count
        args = report_arguments(name, leases, "worker-4")
        plan = await explain(many_running, SQL[name], *args, plan_mode=plan_mode)
        assert_tasks_read_by_primary_key(plan)


class TestSmallBatchesKeepTheirPlan:
    """PostgreSQL plans a prepared statement for its values five times, then keeps a generic
    plan only if that costs no more than the custom ones did. A custom plan that knows a
    report batch holds one or three elements prices it below the generic plan (which guesses
    ten), so at a few reports a batch (W2's rates) every report and heartbeat was planned
    anew: 0.3-0.7 ms of PostgreSQL's CPU each, more than running it."""

    EXECUTIONS = 12

    @pytest.mark.parametrize("count", [1, 3])
    @pytest.mark.parametrize("name", ["task_succeed_many", "task_lease_extend"])
    async def test_a_connection_keeps_the_generic_plan(
        self, many_running: str, name: str, count: int
    ) -> None:
        """After the fifth execution on a connection, every one runs the cached plan."""
        conn = await asyncpg.connect(many_running)
        try:
            leases = await worker_4_leases(conn, count)
            ids, lease_ids = [row["id"] for row in leases], [row["lease_id"] for row in leases]
            # Fenced out (another worker's name): the executions change nothing.
            args = report_arguments(name, leases, "worker-0")
            statement = await conn.prepare(SQL[name])
            for _ in range(self.EXECUTIONS):
                await statement.fetch(*args)
            plans = await conn.fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement = $1",
                SQL[name],
            )
            unchanged = await conn.fetchval(
                "SELECT count(*) FROM conveyor_tasks WHERE id = ANY($1) AND lease_id = ANY($2) "
                "AND worker_id = 'worker-4'",
                ids,
                lease_ids,
            )
        finally:
            await conn.close()
        assert len(leases) == count
        assert unchanged == count  # the fencing refused every execution
        assert (plans["custom_plans"], plans["generic_plans"]) == (5, self.EXECUTIONS - 5)


START_RUNNING_UNSEEN = """
UPDATE conveyor_tasks
SET state = 'running', attempt = 1, started_at = now(), worker_id = 'worker-4',
    lease_id = gen_random_uuid(), lease_expires_at = now() + interval '30 seconds',
    deadline_at = now() + interval '1 minute'
WHERE id IN (SELECT id FROM conveyor_tasks ORDER BY seq LIMIT 500)
"""


@pytest.fixture(scope="module")
def running_unseen(pg_cluster) -> Iterator[str]:
    """50,000 queued tasks analysed before any ran, then 500 of them started: the shape of a
    drain whose last ANALYZE came after a burst of enqueues and before the workers' claims.
    The statistics say no task is running, so `state = 'running'` looks like one row."""
    with backlog(pg_cluster, "unseen", {"t": 50_000}) as url:
        run_sql(url, START_RUNNING_UNSEEN)
        yield url


class TestReportsWhenTheStatisticsSawNothingRunning:
    @pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
    @pytest.mark.parametrize(
        "name",
        [
            "task_succeed_many",
            "task_lease_extend",
            "task_succeed",
            "task_fail",
            "task_release",
        ],
    )
    async def test_a_report_probes_the_primary_key(
        self, running_unseen: str, name: str, plan_mode: str
    ) -> None:
        """Reports and heartbeats find their task by id, whatever the statistics say.

        With `state = 'running'` in the probe, a planner that believed no task was running
        read the running ones through (state, seq) for every report (the index's dead
        entries too): in W1 three runs in ten drained 25-30 % slower, with three times the
        buffer reads per report. A lease (its id and its expiry) says the task runs (the
        table's CHECK ties `state = 'running'` to both), so the probes name the lease and
        its expiry, not the state."""
        conn = await asyncpg.connect(running_unseen)
        try:
            leases = await conn.fetch(
                "SELECT id, lease_id FROM conveyor_tasks WHERE worker_id = 'worker-4' LIMIT 64"
            )
        finally:
            await conn.close()
        assert len(leases) == 64
        ids, lease_ids = [row["id"] for row in leases], [row["lease_id"] for row in leases]
        one, lease = ids[0], lease_ids[0]
        args = {
            "task_succeed_many": (ids, lease_ids, [None] * 64, [False] * 64, ["worker-4"] * 64),
            "task_lease_extend": (ids, lease_ids, 30.0, 10.0, [None] * 64, "worker-4"),
            "task_succeed": (one, lease, None, "worker-4"),
            "task_fail": (one, lease, "ValueError: boom", "failed", True, 1.0, 300.0, "worker-4"),
            "task_release": (one, lease, "handed back", "worker-4", True, 1000),
        }[name]
        plan = await explain(running_unseen, SQL[name], *args, plan_mode=plan_mode)
        assert_tasks_read_by_primary_key(plan)

    @pytest.mark.parametrize(
        "change",
        [
            "SET lease_id = gen_random_uuid(), lease_expires_at = now() WHERE state = 'queued'",
            "SET state = 'succeeded', finished_at = now() WHERE state = 'running'",
        ],
    )
    async def test_only_a_running_task_holds_a_lease(
        self, running_unseen: str, change: str
    ) -> None:
        """The probes above leave the state unnamed because a lease, id and expiry,
        implies 'running': the table refuses one on any other state, and a running task
        without one. (A lease id alone is no lease: test_fencing, TestALeaseIdAloneIsNoLease.)"""
        conn = await asyncpg.connect(running_unseen)
        try:
            async with conn.transaction():
                with pytest.raises(asyncpg.CheckViolationError, match="running_has_lease"):
                    await conn.execute(f"UPDATE conveyor_tasks {change}")
        finally:
            await conn.close()


SEED_FINISHED = """
INSERT INTO conveyor_tasks (
    id, type, state, attempt, max_retries, timeout, started_at, finished_at, worker_id, payload
)
SELECT gen_random_uuid(), 't', 'succeeded', 1, 3, interval '60 seconds', now(), now(),
       'worker-1', ''::bytea
FROM generate_series(1, 50000)
"""

# After the ANALYZE: an incident's worth of failures and cancels, and some live tasks.
SEED_INCIDENT = """
INSERT INTO conveyor_tasks (
    id, type, state, attempt, max_retries, timeout, started_at, finished_at, worker_id,
    lease_id, lease_expires_at, deadline_at, last_error, payload
)
SELECT gen_random_uuid(), 't',
       (ARRAY['failed', 'cancelled', 'queued', 'running'])[g % 4 + 1]::conveyor_task_state,
       CASE WHEN g % 4 = 2 THEN 0 WHEN g % 4 = 0 THEN 4 ELSE 1 END, 3, interval '60 seconds',
       CASE WHEN g % 4 <> 2 THEN now() END, CASE WHEN g % 4 IN (0, 1) THEN now() END,
       CASE WHEN g % 4 <> 2 THEN 'worker-1' END,
       CASE WHEN g % 4 = 3 THEN gen_random_uuid() END,
       CASE WHEN g % 4 = 3 THEN now() + interval '30 seconds' END,
       CASE WHEN g % 4 = 3 THEN now() + interval '1 minute' END,
       CASE WHEN g % 4 = 0 THEN 'ValueError: boom' END, ''::bytea
FROM generate_series(1, 20000) AS g
"""


@pytest.fixture(scope="module")
def incident_unseen(pg_cluster) -> Iterator[str]:
    """50,000 succeeded tasks analyzed, then 5,000 each failed, cancelled, queued and running
    that the statistics never saw: an incident an operator cleans up with a bulk retry or
    cancel before the next ANALYZE (a fifth of the table must change for the leader's)."""
    with seeded_database(
        pg_cluster, "incident", SEED_FINISHED, "ANALYZE conveyor_tasks", SEED_INCIDENT
    ) as url:
        yield url


class TestBulkActionsWhenTheStatisticsSawNoneOfTheirTasks:
    @pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
    @pytest.mark.parametrize(
        ("name", "states"),
        [
            ("task_retry_many", ["failed", "cancelled"]),
            ("task_cancel_many", ["queued", "running"]),
        ],
    )
    async def test_a_page_probes_the_primary_key(
        self, incident_unseen: str, name: str, states: list[str], plan_mode: str
    ) -> None:
        """A page of a bulk retry or cancel finds its tasks by id, whatever the statistics.

        Named by `id = ANY` with `state = ANY` beside it, the planner that believed no task
        was failed read every failed one through (state, seq) for each page: 5,000 here,
        an incident's worth in production, for 500 ids."""
        conn = await asyncpg.connect(incident_unseen)
        try:
            ids = [
                row["id"]
                for row in await conn.fetch(
                    "SELECT id FROM conveyor_tasks WHERE state = ANY($1::conveyor_task_state[]) "
                    "LIMIT 500",
                    states,
                )
            ]
        finally:
            await conn.close()
        assert len(ids) == 500
        plan = await explain(
            incident_unseen,
            SQL[name],
            ids,
            "by an operator",
            states,
            "ops (token 6f0c3b1a)",
            plan_mode=plan_mode,
        )
        assert_tasks_read_by_primary_key(plan)


class TestSpecificIndexes:
    async def test_claim_uses_the_type_state_seq_index(self, seeded: Seeded) -> None:
        """task_claim finds the backlog through (type, state, seq), one range per type."""
        plan = await explain(seeded.url, SQL["task_claim"], *parameters(seeded)["task_claim"])
        assert "conveyor_tasks_type_state_seq_idx" in indexes_used(plan), json.dumps(plan, indent=1)

    async def test_reaper_uses_the_lease_expiry_index(self, seeded: Seeded) -> None:
        """task_reap_expired finds expired leases through conveyor_tasks_lease_expiry_idx, and
        looks up each one's worker (was it heard from after the deadline?) by primary key."""
        plan = await explain(
            seeded.url, SQL["task_reap_expired"], *parameters(seeded)["task_reap_expired"]
        )
        used = indexes_used(plan)
        assert "conveyor_tasks_lease_expiry_idx" in used, json.dumps(plan, indent=1)
        assert "conveyor_workers_pkey" in used, json.dumps(plan, indent=1)

    @pytest.mark.parametrize("name", ["task_list_by_state", "task_list_by_type_and_state"])
    async def test_listings_read_the_index_in_queue_order(self, seeded: Seeded, name: str) -> None:
        """A page is read newest first straight off a (state, seq) index and cut by a LIMIT:
        no sort of every matching task, so a page costs the same on 100,000 tasks."""
        plan = await explain(seeded.url, SQL[name], *parameters(seeded)[name])
        listed = json.dumps(plan, indent=1)
        scans = [n for n in plan_nodes(plan) if n.get("Relation Name") == "conveyor_tasks"]
        assert scans, listed
        for scan in scans:
            assert scan.get("Index Name") in {
                "conveyor_tasks_state_seq_idx",
                "conveyor_tasks_type_state_seq_idx",
            }, listed
            assert scan.get("Scan Direction") == "Backward", listed
        limits = [n for n in plan_nodes(plan) if n["Node Type"] == "Limit"]
        assert any(any(child in scans for child in n.get("Plans", [])) for n in limits), listed

    async def test_history_uses_the_events_index(self, seeded: Seeded) -> None:
        """task_event_list reads one task's history through its primary key (task_id, id)."""
        plan = await explain(
            seeded.url, SQL["task_event_list"], *parameters(seeded)["task_event_list"]
        )
        assert "conveyor_task_events_pkey" in indexes_used(plan), json.dumps(plan, indent=1)

    @pytest.mark.parametrize(
        "name", ["task_get", "task_succeed", "task_fail", "task_release", "task_cancel"]
    )
    async def test_single_task_queries_use_the_primary_key(self, seeded: Seeded, name) -> None:
        """Queries on one task by id go through conveyor_tasks_pkey."""
        plan = await explain(seeded.url, SQL[name], *parameters(seeded)[name])
        assert "conveyor_tasks_pkey" in indexes_used(plan), json.dumps(plan, indent=1)


# 5,000 types of 4 queued tasks each; the type of task g is spam.(g % 5000), and the larger
# g, the older the task: the oldest tasks are of spam.0, spam.4999, spam.4998, ...
SEED_MANY_TYPES = """
INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries, available_at)
SELECT gen_random_uuid(), 'spam.' || (g % 5000), '', interval '60 seconds', 3,
       now() - g * interval '1 millisecond'
FROM generate_series(1, 20000) AS g
"""


@pytest.fixture(scope="module")
def many_types(pg_cluster) -> Iterator[str]:
    """SEED_MANY_TYPES, analysed."""
    statements = (SEED_MANY_TYPES, "ANALYZE conveyor_tasks")
    with seeded_database(pg_cluster, "many_types", *statements) as url:
        yield url


class TestLiveStatsAreBounded:
    async def test_a_top_n_sort_names_the_types_and_one_row_sums_the_rest(
        self, many_types: str
    ) -> None:
        """task_live_stats names $1 types by need, plus those asked for, through a top-N
        sort (only $1 rows in memory), and sums the others in one row: a flood of types
        costs the sampler a bounded answer, and the totals stay exact."""
        conn = await asyncpg.connect(many_types)
        try:
            args = (100, ["spam.2500"])
            raw = await conn.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + SQL["task_live_stats"], *args
            )
            rows = await conn.fetch(SQL["task_live_stats"], *args)
        finally:
            await conn.close()
        plan = json.loads(raw) if isinstance(raw, str) else raw
        sorts = [node.get("Sort Method") for node in plan_nodes(plan) if "Sort Method" in node]
        assert "top-N heapsort" in sorts, json.dumps(plan, indent=1)
        named = {row["type"]: row for row in rows if row["type"] is not None}
        (other,) = [row for row in rows if row["type"] is None]
        oldest = {"spam.0", *(f"spam.{5000 - i}" for i in range(1, 100))}
        assert set(named) == {*oldest, "spam.2500"}
        assert all(row["queued"] == 4 and row["types"] == 1 for row in named.values())
        assert (other["types"], other["queued"], other["running"]) == (4899, 4899 * 4, 0)
        assert other["oldest_queued_seconds"] < min(
            row["oldest_queued_seconds"] for name, row in named.items() if name in oldest
        )


class TestExplainChangesNothing:
    async def test_data_is_unchanged_after_explaining_every_query(self, seeded: Seeded) -> None:
        """EXPLAINing the data-modifying queries (rolled back) leaves every row as it was."""
        query = (
            "SELECT state::text, count(*) AS n, count(lease_id) AS leases "
            "FROM conveyor_tasks GROUP BY state ORDER BY state"
        )

        async def snapshot() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(seeded.url)
            try:
                tasks = [tuple(row) for row in await conn.fetch(query)]
                events = await conn.fetchval("SELECT count(*) FROM conveyor_task_events")
            finally:
                await conn.close()
            return [*tasks, ("events", events)]

        before = await snapshot()
        params = parameters(seeded)
        for name in PER_TASK_QUERIES:
            await explain(seeded.url, SQL[name], *params[name])
        assert await snapshot() == before


def late_then_old_database(
    pg_cluster: Any, name: str, late: int, old: int
) -> contextlib.AbstractContextManager[str]:
    """`late` tasks finished 10 minutes ago ahead of `old` ones finished 2 hours ago (by
    queue position), a queue-position mark 90 minutes back, and this test's leader."""
    return seeded_database(
        pg_cluster,
        name,
        prune_tasks_sql(late, "10 minutes"),
        prune_tasks_sql(old, "2 hours"),
        "INSERT INTO conveyor_seq_marks (marked_at, seq) "
        "SELECT now() - interval '90 minutes', max(seq) FROM conveyor_tasks",
        "INSERT INTO conveyor_leader (name, holder, term, expires_at) "
        "VALUES ('maintenance', 'server-1', 1, now() + interval '1 hour')",
        "ANALYZE conveyor_tasks",
    )


def prune_tasks_sql(count: int, finished_ago: str) -> str:
    """Insert `count` cancelled tasks that finished `finished_ago` (an interval literal)."""
    return (
        "INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries, state, "  # noqa: S608 - test constants
        f"finished_at) SELECT gen_random_uuid(), 'prune', '', interval '60 seconds', 0, "
        f"'cancelled', now() - interval '{finished_ago}' FROM generate_series(1, {count})"
    )


class TestPruneReadsWhatItDeletes:
    """A retention batch once walked every finished task younger than the cutoff (358 ms at
    1.2 million, under the leader row's lock that elections wait for); the queue-position
    marks (migration 0013) stop it where nothing can be old enough."""

    OLD, YOUNG = 500, 20_000

    @staticmethod
    def prune(pg_cluster: Any, mark_sql: str, mark_slack: float) -> tuple[int, int]:
        """Seed the old finished tasks, a mark, the young ones; one batch of a 1-hour
        retention: (rows of conveyor_tasks it read, tasks left)."""

        async def run(url: str) -> tuple[Any, int]:
            conn = await asyncpg.connect(url)
            try:
                raw = await conn.fetchval(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + SQL["task_prune_finished"],
                    3600.0,
                    1000,
                    "server-1",
                    1,
                    mark_slack,
                    [0, 0, 0],
                    10_000,
                )
                left = await conn.fetchval("SELECT count(*) FROM conveyor_tasks")
            finally:
                await conn.close()
            return json.loads(raw) if isinstance(raw, str) else raw, left

        with seeded_database(
            pg_cluster,
            "prune",
            prune_tasks_sql(TestPruneReadsWhatItDeletes.OLD, "2 hours"),
            mark_sql,
            prune_tasks_sql(TestPruneReadsWhatItDeletes.YOUNG, "10 minutes"),
            "INSERT INTO conveyor_leader (name, holder, term, expires_at) "
            "VALUES ('maintenance', 'server-1', 1, now() + interval '1 hour')",
            "ANALYZE conveyor_tasks",
        ) as url:
            plan, left = asyncio.run(run(url))
        # Rows of conveyor_tasks the search looked at, by whatever path (the deletes probe
        # the primary key).
        return rows_read(plan), left

    def test_a_batch_reads_the_old_tasks_not_the_young_ones(self, pg_cluster) -> None:
        # What the leader's round recorded after the old tasks were enqueued, aged with them:
        # 30 minutes before the cutoff, within the slack of an hour.
        read, left = self.prune(
            pg_cluster,
            "INSERT INTO conveyor_seq_marks (marked_at, seq) "
            "SELECT now() - interval '90 minutes', max(seq) FROM conveyor_tasks",
            mark_slack=3600.0,
        )
        assert left == self.YOUNG  # the old ones went, in one batch
        # The old tasks, and not the young ones behind them (20,500 before the marks): twice,
        # in the index alone to find where the batch's read limit falls (past them: there
        # are fewer), then to walk them; a few rows either way for PostgreSQL 15's
        # whole-number average per loop.
        assert 2 * self.OLD - 10 <= read < 2 * self.OLD + 100

    def test_after_a_gap_in_the_marks_the_old_tasks_are_not_left_waiting(self, pg_cluster) -> None:
        """The newest mark is a month old (retention was off since): stopping there would
        leave the old tasks for a whole retention more. The walk goes on to the sequence's
        last value instead, and reads the young tasks too, until marks catch up."""
        read, left = self.prune(
            pg_cluster,
            "INSERT INTO conveyor_seq_marks (marked_at, seq) "
            "VALUES (now() - interval '30 days', 0)",
            mark_slack=90.0,
        )
        assert left == self.YOUNG
        # Past the stale mark, through the young tasks (PostgreSQL 15 rounds each loop's
        # average row count to a whole number, so allow for that).
        assert read >= self.YOUNG

    def test_a_rounds_next_batch_does_not_read_again_what_the_first_skipped(
        self, pg_cluster
    ) -> None:
        """Tasks with an old seq that finished late (a backlog drained, or a type paused,
        for longer than the retention) come first in their state's walk, young, before the
        old ones: every batch read them all again (at a million, 0.3-0.8 s a batch under
        the leader row's lock). A round's next batch goes on where the previous one's walk
        reached, and reads what it deletes. (With no read limit to speak of: the first
        batch reads all of them, as it did before there was one.)"""
        batch = 200
        no_read_limit = 10 * self.YOUNG

        async def run(url: str) -> tuple[int, int, int]:
            conn = await asyncpg.connect(url)
            try:
                leader = queries.LeaderProof("server-1", 1)
                first = await queries.task_prune_finished(
                    conn,
                    retention=timedelta(hours=1),
                    limit=batch,
                    leader=leader,
                    mark_slack=timedelta(hours=1),
                    read_limit=no_read_limit,
                )
                assert first.pruned == {"cancelled": batch}
                arguments = [3600.0, batch, "server-1", 1, 3600.0]

                async def measured(after: list[int]) -> int:
                    """Rows the next batch reads, starting after `after`; rolled back, so
                    each start is measured on the same rows."""
                    transaction = conn.transaction()
                    await transaction.start()
                    try:
                        raw = await conn.fetchval(
                            "EXPLAIN (ANALYZE, FORMAT JSON) " + SQL["task_prune_finished"],
                            *arguments,
                            after,
                            no_read_limit,
                        )
                        left = await conn.fetchval(
                            "SELECT count(*) FROM conveyor_tasks "
                            "WHERE finished_at < now() - interval '1 hour'"
                        )
                    finally:
                        await transaction.rollback()
                    assert left == self.OLD - 2 * batch
                    return rows_read(json.loads(raw) if isinstance(raw, str) else raw)

                from_the_start = await measured([0, 0, 0])
                carried_on = await measured(
                    [first.reached[state] for state in queries.PRUNED_STATES]
                )
            finally:
                await conn.close()
            return from_the_start, carried_on, len(first.reached)

        with late_then_old_database(pg_cluster, "prune_late", self.YOUNG, self.OLD) as url:
            from_the_start, carried_on, states = asyncio.run(run(url))
        assert states == len(queries.PRUNED_STATES)
        # From the start of the walk: the young ones again, then the batch.
        assert from_the_start >= self.YOUNG
        # On from the first batch: the old tasks left in the index alone (where the read
        # limit falls: past them), then the batch, and a few rows for PostgreSQL 15's
        # rounding.
        assert (self.OLD - batch) + batch - 10 <= carried_on < (self.OLD - batch) + batch + 50


# Rows of conveyor_tasks read by a sequential scan or through an index other than the
# primary key (whose probes only find rows already found), counted by this backend and not
# yet reported (compare two readings in one transaction).
ROWS_READ_SO_FAR = """
SELECT pg_stat_get_xact_tuples_returned('conveyor_tasks'::regclass)
     + coalesce((SELECT sum(pg_stat_get_xact_tuples_returned(i.indexrelid)) FROM pg_index AS i
                 WHERE i.indrelid = 'conveyor_tasks'::regclass
                   AND i.indexrelid <> 'conveyor_tasks_pkey'::regclass), 0)
"""


class TestPruneReadLimit:
    """Tasks with an old seq that finished late (a backlog drained, or a type paused, for
    longer than the retention) come first in their state's walk, young. The round's first
    batch read all of them in one statement: 0.42 s at a million, and at about 8 million
    past the leader's statement budget (3.3 s), every round, so that retention stopped for
    good. A batch now reads at most its read limit of each state's tasks (ten batches),
    says there is more, and the next one goes on from there."""

    LATE, OLD, BATCH = 20_000, 500, 100

    def test_each_batch_reads_at_most_its_read_limit_and_the_walk_gets_past(
        self, pg_cluster
    ) -> None:
        read_limit = 10 * self.BATCH  # the default: queries.PRUNE_READ_BATCHES batches

        async def run(url: str) -> tuple[list[tuple[int, int]], list[queries.PruneBatch], int, int]:
            conn = await asyncpg.connect(url)
            batches: list[tuple[int, int]] = []  # (rows read, tasks deleted) per batch
            walks: list[queries.PruneBatch] = []
            walk: queries.PruneBatch | None = None
            try:
                for _ in range(100):
                    previous = walk
                    async with conn.transaction():
                        before = await conn.fetchval(ROWS_READ_SO_FAR)
                        walk = await queries.task_prune_finished(
                            conn,
                            retention=timedelta(hours=1),
                            limit=self.BATCH,
                            leader=queries.LeaderProof("server-1", 1),
                            mark_slack=timedelta(hours=1),
                            after=walk,
                        )
                        read = await conn.fetchval(ROWS_READ_SO_FAR) - before
                    batches.append((int(read), sum(walk.pruned.values())))
                    walks.append(walk)
                    if not walk.pruned and previous and walk.reached == previous.reached:
                        break  # the walk reached the end
                old_left = await conn.fetchval(
                    "SELECT count(*) FROM conveyor_tasks "
                    "WHERE finished_at < now() - interval '1 hour'"
                )
                young_left = await conn.fetchval(
                    "SELECT count(*) FROM conveyor_tasks "
                    "WHERE finished_at >= now() - interval '1 hour'"
                )
            finally:
                await conn.close()
            return batches, walks, old_left, young_left

        with late_then_old_database(pg_cluster, "prune_capped", self.LATE, self.OLD) as url:
            batches, walks, old_left, young_left = asyncio.run(run(url))
        # Each batch: at most the read limit twice (in the index alone to find where the
        # limit falls, then the walk up to there), and a few rows for empty states.
        first_read, first_deleted = batches[0]
        assert first_read <= 2 * read_limit + 10, batches[0]
        assert first_deleted == 0
        assert max(read for read, _ in batches) <= 2 * read_limit + 10, batches
        # Past the late ones in twenty batches of 1,000, each saying there is more; then the
        # old ones, five full batches, and one that finds nothing left.
        capped, full = self.LATE // read_limit, self.OLD // self.BATCH
        assert [walk.more for walk in walks] == [True] * capped + [False] * (full + 1)
        assert [deleted for _, deleted in batches] == [0] * capped + [self.BATCH] * full + [0]
        assert (old_left, young_left) == (0, self.LATE)
        assert read_limit == queries.PRUNE_READ_BATCHES * self.BATCH

    async def test_a_read_limit_below_the_batch_size_is_refused(self, seeded: Seeded) -> None:
        """Such a batch could never fill: refused before anything runs."""
        conn = await asyncpg.connect(seeded.url)
        try:
            with pytest.raises(ValueError, match="read limit of at least its size"):
                await queries.task_prune_finished(
                    conn,
                    retention=timedelta(hours=1),
                    limit=100,
                    leader=queries.LeaderProof("server-1", 1),
                    read_limit=99,
                )
        finally:
            await conn.close()


def scheduled_sql(task_type: str, count: int, due_in: str) -> str:
    """Insert `count` tasks of `task_type` waiting out a retry backoff that ends in `due_in`."""
    return (
        "INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries, state, attempt, "  # noqa: S608 - test constants
        f"available_at) SELECT gen_random_uuid(), '{task_type}', '', interval '60 seconds', 3, "
        f"'scheduled', 1, now() + interval '{due_in}' FROM generate_series(1, {count})"
    )


def rows_read(plan: Any) -> int:
    """Rows of conveyor_tasks a plan looked at through its indexes or a sequential scan
    (the primary key's probes of rows already found are not counted)."""
    return round(
        sum(
            (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
            for node in plan_nodes(plan)
            if (node["Node Type"] == "Seq Scan" and node["Relation Name"] == "conveyor_tasks")
            or (
                node.get("Index Name", "").startswith("conveyor_tasks_")
                and node["Index Name"] != "conveyor_tasks_pkey"
            )
        )
    )


STORM = 20_000


@pytest.fixture(scope="module")
def retry_storm(pg_cluster) -> Iterator[str]:
    """A downstream outage's shape: 20,000 tasks of `storm` waiting out their backoff ahead
    of 100 that are available, 20,000 of `outage` with none available, and 100 of `due`
    whose backoff has just ended among 20,000 still waiting."""
    with seeded_database(
        pg_cluster,
        "storm",
        scheduled_sql("storm", STORM, "5 minutes"),
        "INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries) "
        "SELECT gen_random_uuid(), 'storm', '', interval '60 seconds', 3 "
        "FROM generate_series(1, 100)",
        scheduled_sql("outage", STORM, "5 minutes"),
        scheduled_sql("due", 100, "-1 second"),
        scheduled_sql("due", STORM, "5 minutes"),
        "ANALYZE conveyor_tasks",
    ) as url:
        yield url


class TestARetryStormStaysOutOfTheQueue:
    """Tasks waiting out a backoff were `queued` with a future `available_at`, at the head of
    their type's range of (type, state, seq): a claim walked past every one of them (34 ms
    for a claim of 10 behind 300,000, 109 ms when none was available), and so did a handed-
    over enqueue's FIFO check. As `scheduled` (migration 0015) they are out of that range."""

    @pytest.mark.parametrize(
        ("wanted", "most_rows"),
        # Behind the backlog, 100 available: it reads the 10 it takes. All in backoff:
        # it reads nothing.
        [("storm", 20), ("outage", 2)],
        ids=["available-behind-the-backlog", "nothing-available"],
    )
    async def test_a_claim_reads_the_available_tasks_not_the_backlog(
        self, retry_storm: str, wanted: str, most_rows: int
    ) -> None:
        plan = await explain(
            retry_storm,
            SQL["task_claim"],
            [wanted],
            10,
            "worker-1",
            30.0,
            10.0,
            None,
            1024,
            analyze=True,
        )
        assert rows_read(plan) <= most_rows, json.dumps(plan, indent=1)

    async def test_a_handed_over_enqueue_does_not_walk_the_backlog(self, retry_storm: str) -> None:
        plan = await explain(
            retry_storm,
            SQL["task_insert_leasing"],
            [str(uuid.uuid4())],
            ["outage"],
            [b"payload"],
            [60.0],
            [3],
            [None],
            ["worker-1"],
            30.0,
            10.0,
            [str(uuid.uuid4())],
            analyze=True,
        )
        assert rows_read(plan) <= 5, json.dumps(plan, indent=1)

    async def test_promotion_reads_the_due_tasks_through_its_index(self, retry_storm: str) -> None:
        plan = await explain(retry_storm, SQL["task_promote_due"], 1000, analyze=True)
        assert "conveyor_tasks_scheduled_idx" in indexes_used(plan), json.dumps(plan, indent=1)
        assert rows_read(plan) <= 110, json.dumps(plan, indent=1)
        conn = await asyncpg.connect(retry_storm)
        try:
            transaction = conn.transaction()
            await transaction.start()
            try:
                assert await conn.fetchval(SQL["task_promote_due"], 1000) == 100
                # In their place: the promoted tasks keep their seq, ahead of any enqueued
                # after them, and none still in backoff moved.
                queued = await conn.fetchval(
                    "SELECT count(*) FROM conveyor_tasks WHERE type = 'due' AND state = 'queued' "
                    "AND available_at <= now()"
                )
                assert queued == 100
            finally:
                await transaction.rollback()
        finally:
            await conn.close()


# --- At a million tasks ------------------------------------------------------------------
# The per-task queries use an index also at a million tasks in mixed states (and their
# history), in custom and generic plans, and those that act on one task or a bounded batch
# read a bounded number of rows.

MILLION_TASKS = """
INSERT INTO conveyor_tasks (
    id, type, state, attempt, max_retries, timeout, created_at, available_at, started_at,
    finished_at, worker_id, lease_id, lease_expires_at, deadline_at, payload, result
)
SELECT
    gen_random_uuid(),
    CASE WHEN g % 10 < 7 THEN 'a' WHEN g % 10 < 9 THEN 'b' ELSE 'c' END,
    s.state::conveyor_task_state,
    CASE WHEN s.state = 'queued' THEN 0 ELSE 1 END,
    3,
    interval '60 seconds',
    now() - interval '3 days' + g * interval '200 milliseconds',
    CASE WHEN s.state = 'scheduled' THEN now() + interval '1 minute'
         ELSE now() - interval '3 days' + g * interval '200 milliseconds' END,
    CASE WHEN s.state NOT IN ('queued') THEN now() - interval '1 hour' END,
    CASE WHEN s.state IN ('succeeded', 'failed', 'cancelled')
         THEN now() - interval '3 days' + g * interval '200 milliseconds' END,
    CASE WHEN s.state <> 'queued' THEN 'worker-' || (g % 50) END,
    CASE WHEN s.state = 'running' THEN gen_random_uuid() END,
    CASE WHEN s.state = 'running' AND g % 2 = 0 THEN now() - interval '5 seconds'
         WHEN s.state = 'running' THEN now() + interval '1 hour' END,
    CASE WHEN s.state = 'running' THEN now() + interval '2 hours' END,
    convert_to('payload ' || g, 'UTF8'),
    NULL
FROM generate_series(1, 1000000) AS g
CROSS JOIN LATERAL (
    SELECT CASE WHEN g % 100 < 70 THEN 'succeeded'
                WHEN g % 100 < 80 THEN 'failed'
                WHEN g % 100 < 85 THEN 'cancelled'
                WHEN g % 100 < 95 THEN 'queued'
                WHEN g % 100 < 97 THEN 'scheduled'
                ELSE 'running' END AS state
) AS s
"""

MILLION_EVENTS = """
INSERT INTO conveyor_task_events (task_id, at, event, state, attempt, worker_id)
SELECT t.id, t.created_at + e.n * interval '1 second',
       (ARRAY['started', 'succeeded'])[e.n], t.state, 1, t.worker_id
FROM conveyor_tasks AS t
CROSS JOIN generate_series(1, 2) AS e (n)
WHERE t.state <> 'queued'
"""


@pytest.fixture(scope="module")
def million(pg_cluster) -> Iterator[Seeded]:
    statements = (
        MILLION_TASKS,
        MILLION_EVENTS,
        "VACUUM ANALYZE conveyor_tasks",
        "VACUUM ANALYZE conveyor_task_events",
    )
    with seeded_database(pg_cluster, "million", *statements) as url:
        yield asyncio.run(pick_tasks(url, live_lease=" AND lease_expires_at > now()"))


def big_table_rows_read(plan: Any) -> int:
    """Rows of the big tables a plan read, through an index or a scan, filtered or not."""
    total = 0
    for node in plan_nodes(plan):
        if node.get("Relation Name") in BIG_TABLES or "Index Name" in node:
            total += int(node.get("Actual Rows", 0)) * int(node.get("Actual Loops", 1))
            total += int(node.get("Rows Removed by Filter", 0))
    return total


# Queries that act on one task or a bounded batch: they must read a bounded number of rows
# whatever the table holds. Listings of a state, counts and live stats read their range;
# the sweeper reads the workers.
READ_THEIR_RANGE = frozenset(
    {
        "worker_sweep_lost",
        "task_live_stats",
        "task_explain",
        "task_list_by_state",
        "task_list_by_type_and_state",
        "task_count_by_state",
        "task_count_by_type_and_state",
        "task_list_oldest_by_state",
        "task_list_oldest_by_type_and_state",
        "task_event_buckets",
    }
)
BOUNDED = [name for name in PER_TASK_QUERIES if name not in READ_THEIR_RANGE]


@pytest.mark.slow  # a million tasks built for it
@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("name", PER_TASK_QUERIES)
async def test_no_sequential_scan_at_a_million(million, name, plan_mode) -> None:
    plan = await explain(million.url, SQL[name], *parameters(million)[name], plan_mode=plan_mode)
    assert seq_scans_on_big_tables(plan) == [], json.dumps(plan, indent=1)[:20000]


@pytest.mark.slow
@pytest.mark.parametrize("name", BOUNDED)
async def test_bounded_queries_read_few_rows_at_a_million(million, name) -> None:
    plan = await explain(million.url, SQL[name], *parameters(million)[name], analyze=True)
    read = big_table_rows_read(plan)
    assert read < 50_000, (read, plan[0].get("Execution Time"), json.dumps(plan, indent=1)[:20000])
