"""Conveyor against the roles and role settings a DBA imposes.

The fixtures give a superuser; production gives a role that owns nothing but what it was
granted, with settings (`ALTER ROLE ... SET`) chosen by someone else.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import asyncpg
import pytest
from helpers import (
    AppRole,
    Db,
    assert_one_error_line,
    run_cli,
    run_sql,
    wait_for,
    with_database,
    with_user,
)

from conveyor import Client, Task


@pytest.fixture
def foreign_database(pg_cluster):
    """An empty database owned by one role, and a login role that may only connect to it
    (the PostgreSQL 15+ default: no CREATE on schema public for non-owners)."""
    suffix = uuid.uuid4().hex[:10]
    owner, app, name = f"rv_owner_{suffix}", f"rv_app_{suffix}", f"rv_db_{suffix}"
    run_sql(
        pg_cluster.admin_url,
        f'CREATE ROLE "{owner}" LOGIN',
        f'CREATE ROLE "{app}" LOGIN',
        f'CREATE DATABASE "{name}" OWNER "{owner}"',
        f'GRANT CONNECT ON DATABASE "{name}" TO "{app}"',
    )
    admin_url = with_database(pg_cluster.admin_url, name)
    yield with_user(admin_url, app), with_user(admin_url, owner), admin_url, owner, app
    run_sql(
        pg_cluster.admin_url,
        f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
        f'DROP ROLE IF EXISTS "{app}"',
        f'DROP ROLE IF EXISTS "{owner}"',
    )


def test_migrate_as_a_role_without_create_on_the_schema_is_one_error_line(
    foreign_database,
) -> None:
    """operations.md: "a statement PostgreSQL refuses (`must be owner of ...`) fails the run
    with one line naming the migration (`MigrationFailed`), and nothing is applied". A role
    that was granted CONNECT only (no CREATE on schema public, the default since PG 15)
    got an asyncpg traceback instead: the ledger's CREATE TABLE runs outside `_run`."""
    app_url, _owner_url, _admin, _owner, _app = foreign_database
    result = run_cli("migrate", "--database-url", app_url)
    line = assert_one_error_line(result)
    assert "permission denied" in line, line


def test_migrate_on_a_read_only_role_is_one_error_line(foreign_database) -> None:
    """The URL leads to a session that takes no writes (`default_transaction_read_only`
    set on the role, or a replica by mistake): migrate should say so in one line, not
    print an asyncpg traceback."""
    _app_url, owner_url, admin_url, owner, _app = foreign_database
    run_sql(admin_url, f'ALTER ROLE "{owner}" SET default_transaction_read_only = on')
    result = run_cli("migrate", "--database-url", owner_url)
    line = assert_one_error_line(result)
    assert "read-only" in line, line


def test_a_role_lock_timeout_is_a_retryable_error_not_internal(
    app_role: AppRole, start_server
) -> None:
    """A DBA's `ALTER ROLE ... SET lock_timeout = '200ms'`: the server overrides the role's
    statement_timeout and idle timeout but not lock_timeout, and 55P03
    (lock_not_available) is not among the "unavailable" errors. A call that waits more
    than 200 ms for a row lock (here an operator's transaction holding the task row for a
    second) then answers INTERNAL, which clients do not retry, instead of UNAVAILABLE (as
    a statement timeout is) or simply waiting."""
    run_sql(app_role.admin_url, f"ALTER ROLE \"{app_role.name}\" SET lock_timeout = '200ms'")
    server = start_server(database_url=app_role.url)
    with Client(server.address) as client:
        task_id = client.enqueue_task(Task("noop", b"x"))
        locked = threading.Event()
        release = threading.Event()

        def hold_the_row() -> None:
            async def go() -> None:
                conn = await asyncpg.connect(app_role.admin_url)
                try:
                    async with conn.transaction():
                        await conn.execute(
                            "SELECT 1 FROM conveyor_tasks WHERE id = $1::uuid FOR UPDATE",
                            task_id,
                        )
                        locked.set()
                        await asyncio.to_thread(release.wait, 10)
                finally:
                    await conn.close()

            asyncio.run(go())

        holder = threading.Thread(target=hold_the_row, daemon=True)
        holder.start()
        assert locked.wait(10)
        threading.Timer(1.0, release.set).start()
        try:
            status = client.cancel_task(task_id)
        finally:
            release.set()
            holder.join(10)
        assert status.state.name.lower() == "cancelled", status


@pytest.mark.parametrize(
    "setting",
    [
        "statement_timeout = '200ms'",
        "idle_in_transaction_session_timeout = '1s'",
        "default_transaction_isolation = 'serializable'",
    ],
)
def test_role_settings_a_dba_imposes_keep_every_task_once(
    app_role: AppRole, start_server, spawn_worker, ledger, setting: str
) -> None:
    """The server overrides statement_timeout and
    idle_in_transaction_session_timeout at connect, and serializable transactions only add
    conflicts it answers as UNAVAILABLE: 200 tasks each run once and succeed."""
    run_sql(app_role.admin_url, f'ALTER ROLE "{app_role.name}" SET {setting}')
    server = start_server(database_url=app_role.url)
    spawn_worker(server.address, concurrency=8)
    with Client(server.address) as client:
        ids = client.enqueue_tasks([Task("noop", b"x") for _ in range(200)])
    db = Db(app_role.admin_url)
    wait_for(
        lambda: (
            db.fetchval(
                "SELECT count(*) FROM conveyor_tasks"
                " WHERE state = 'succeeded' AND id = ANY($1::uuid[])",
                ids,
            )
            == len(ids)
        ),
        timeout=60,
        what="every task to succeed",
    )
    assert db.fetchval("SELECT max(attempt) FROM conveyor_tasks") == 1
    started = [e["task_id"] for e in ledger.started()]
    assert len(started) == len(set(started)) == len(ids)
