"""A migration behind a long transaction: short lock waits, retries, then a clear failure.

A migration that drops an index of conveyor_tasks needs the table's ACCESS EXCLUSIVE lock.
Queued behind a long transaction (a pg_dump, a report), it waited for as long as that ran,
and every claim and enqueue queued behind it: the whole queue stopped. Now each attempt
waits a lock timeout at most, traffic flows between attempts, and after the last one
`migrate` fails naming the sessions in its way, having applied nothing. The long
transaction here is a real one, a REPEATABLE READ snapshot that read the task table, as
pg_dump's is; the migration is 0012's DROP INDEX, on a database taken back to schema 11.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from helpers import BACK_TO_SCHEMA_11, async_wait_for

from conveyor.errors import MigrationBlocked
from conveyor.server.app import ConveyorServer
from conveyor.server.config import ServerConfig
from conveyor.storage import migrate, queries
from conveyor.types import new_task_id

LATEST = migrate.latest_version()
BACKUP = "nightly backup"


@pytest.fixture
async def at_schema_11(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        for statement in BACK_TO_SCHEMA_11:
            await conn.execute(statement)
    finally:
        await conn.close()
    return database_url


@contextlib.asynccontextmanager
async def long_transaction(url: str) -> AsyncIterator[int]:
    """A pg_dump stand-in: a snapshot that read conveyor_tasks, held open. Yields its pid."""
    conn = await asyncpg.connect(url, server_settings={"application_name": BACKUP})
    try:
        await conn.execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM conveyor_tasks"
        )
        yield conn.get_server_pid()
        await conn.execute("ROLLBACK")
    finally:
        await conn.close()


async def ledger(conn: Any) -> list[int]:
    return await migrate.applied_versions(conn)


async def waiting_for_a_lock(observer: Any, application_name: str) -> bool:
    """Whether a session of that name waits for a lock on conveyor_tasks right now."""
    return bool(
        await observer.fetchval(
            "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid) "
            "WHERE NOT l.granted AND l.relation = 'conveyor_tasks'::regclass "
            "AND a.application_name LIKE $1",
            application_name,
        )
    )


def transaction_open(message: str) -> str:
    """The age of the blocking transaction as the message says it (it varies)."""
    match = re.search(r"transaction open ([0-9.]+ s)\)", message)
    assert match, message
    return match[1]


def a_task() -> queries.NewTask:
    return queries.NewTask(new_task_id(), "locks.t", b"", timedelta(minutes=1), 0)


class TestMigrateBehindALongTransaction:
    async def test_it_gives_up_naming_the_blocker_and_applies_nothing(self, at_schema_11) -> None:
        conn = await asyncpg.connect(at_schema_11)
        observer = await asyncpg.connect(at_schema_11)
        try:
            async with long_transaction(at_schema_11) as backup_pid:
                with pytest.raises(MigrationBlocked) as caught:
                    await migrate.migrate(
                        conn,
                        lock_timeout=timedelta(milliseconds=200),
                        attempts=2,
                        observer=observer,
                    )
            message = caught.value.message
            assert message == (
                "migration 0012_no_running_worker_index could not get its table lock: 2 waits "
                "of 0.2 s each timed out (claims and enqueues queue behind a waiting "
                "migration, so it waits no longer), nothing was applied; blocked by "
                f"pid {backup_pid} (application '{BACKUP}', idle in transaction, transaction "
                f"open {transaction_open(message)}): let it finish (a backup, a long query) or "
                f"end it with SELECT pg_terminate_backend({backup_pid}), then migrate again"
            )
            assert "\n" not in message
            assert await ledger(conn) == list(range(1, 12))
            assert await conn.fetchval(
                "SELECT to_regclass('conveyor_tasks_running_worker_idx') IS NOT NULL"
            )
        finally:
            await observer.close()
            await conn.close()

    async def test_claims_and_enqueues_go_on_while_it_waits_and_it_applies_once_free(
        self, at_schema_11
    ) -> None:
        """Before: the enqueue waited behind the migration until the backup ended."""
        migrating = await asyncpg.connect(
            at_schema_11, server_settings={"application_name": "migrating"}
        )
        producer = await asyncpg.connect(at_schema_11)
        try:
            async with long_transaction(at_schema_11):
                migration = asyncio.create_task(
                    migrate.migrate(
                        migrating, lock_timeout=timedelta(milliseconds=300), attempts=100
                    )
                )
                await async_wait_for(
                    lambda: waiting_for_a_lock(producer, "migrating"),
                    what="the migration to wait for the task table",
                )
                # Queued behind the migration's lock request for one lock timeout at most.
                inserted = await asyncio.wait_for(
                    queries.task_insert_many(producer, [a_task()]), timeout=10
                )
                assert inserted == [True]
                claimed = await asyncio.wait_for(
                    queries.task_claim(
                        producer,
                        task_types=["locks.t"],
                        limit=1,
                        worker_id="w",
                        lease_ttl=timedelta(seconds=30),
                        deadline_grace=timedelta(seconds=10),
                    ),
                    timeout=10,
                )
                assert len(claimed.rows) == 1
                assert not migration.done()
            applied = await asyncio.wait_for(migration, timeout=30)
            assert [m.version for m in applied] == list(range(12, LATEST + 1))
        finally:
            await producer.close()
            await migrating.close()


class TestServerMigrateBehindALongTransaction:
    async def test_it_waits_past_the_statement_timeout_then_starts(self, at_schema_11) -> None:
        """`server --migrate` migrated on a pooled connection, under its statement timeout:
        a lock wait longer than that failed the start (and stalled traffic until then),
        and a migration that truly needs longer could never be applied that way."""
        config = ServerConfig(
            database_url=at_schema_11,
            grpc_listen="127.0.0.1:0",
            http_listen=None,
            migrate=True,
            statement_timeout=timedelta(milliseconds=500),
            server_id="migrating-server",
        )
        server = ConveyorServer(config)
        observer = await asyncpg.connect(at_schema_11)
        try:
            async with long_transaction(at_schema_11):
                starting = asyncio.create_task(server.start(startup_timeout=30))
                # Waiting for longer than the statement timeout, not cancelled by it.
                await async_wait_for(
                    lambda: observer.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND application_name LIKE '%migrating-server' "
                        "AND now() - query_start > interval '1 second'"
                    ),
                    what="the server's migration to wait a second for the task table",
                )
            await asyncio.wait_for(starting, timeout=30)
            ready, checks = await server.readiness()
            assert ready is True
            assert checks["schema_version"] == LATEST
        finally:
            await server.stop()
            await observer.close()

    async def test_it_gives_up_as_conveyor_migrate_does(self, at_schema_11) -> None:
        config = ServerConfig(
            database_url=at_schema_11,
            grpc_listen="127.0.0.1:0",
            http_listen=None,
            migrate=True,
            migrate_lock_timeout=timedelta(milliseconds=200),
            migrate_lock_attempts=2,
        )
        server = ConveyorServer(config)
        try:
            async with long_transaction(at_schema_11) as backup_pid:
                with pytest.raises(MigrationBlocked, match=f"blocked by pid {backup_pid} "):
                    await server.start(startup_timeout=10)
        finally:
            await server.stop()
        conn = await asyncpg.connect(at_schema_11)
        try:
            assert await ledger(conn) == list(range(1, 12))
        finally:
            await conn.close()
