"""Servers behind a real PgBouncer, and the pooler settings they must refuse.

Session pooling works out of the box: the server sends PgBouncer no startup parameter but
application_name, and applies its timeouts once the session is open (it used to send
statement_timeout at startup; stock PgBouncer refused it and the server retried for its
whole start-up timeout, then blamed the network). Transaction and statement pooling share
sessions between clients, which breaks the session's timeouts, LISTEN and prepared
statements quietly; the server refuses to start on them, saying what to change.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import asyncpg
import pytest
from helpers import (
    BACK_TO_SCHEMA_11,
    Db,
    assert_one_error_line,
    run_cli,
    run_sql,
    wait_final,
    wait_for,
)
from pgbouncer import PgBouncer, available

from conveyor import Client, Task, TaskState, Worker
from conveyor.errors import ConfigError, MigrationBlocked
from conveyor.server.config import ServerConfig
from conveyor.server.database import Database
from conveyor.storage import migrate

pytestmark = pytest.mark.skipif(not available(), reason="pgbouncer is not installed")


def connect_database(url: str, **settings: object) -> Database:
    """A Database connected to `url` (run inside an event loop; close it afterwards)."""
    return Database(ServerConfig(database_url=url, **settings))  # type: ignore[arg-type]


def start_and_stop(url: str) -> None:
    """Open a server's connections to `url` as a starting server does, then close them."""

    async def scenario() -> None:
        database = connect_database(url)
        try:
            await database.connect(startup_timeout=timedelta(seconds=30))
        finally:
            await database.close()

    asyncio.run(scenario())


class TestSessionPooling:
    def test_servers_behind_pgbouncer_run_tasks_end_to_end(
        self, database_url: str, start_server
    ) -> None:
        """Two servers through PgBouncer in session mode: both start at once, listen for
        notifications, and a task enqueued through one runs on a worker of the other."""
        with PgBouncer(database_url, pool_mode="session") as bouncer:
            started = time.monotonic()
            first = start_server(database_url=bouncer.url)
            second = start_server(database_url=bouncer.url)
            # Not the start-up timeout (10 s here) spent retrying a refused parameter.
            assert time.monotonic() - started < 8
            for server in (first, second):
                wait_for(server.server.notifier.listening.is_set, what="LISTEN through PgBouncer")
            worker = Worker(second.address, concurrency=2)
            worker.register_handler("echo", lambda _ctx, payload: payload[::-1])
            worker.start()
            try:
                with Client(first.address) as client:
                    task_id = client.enqueue_task(Task(type="echo", payload=b"abc"))
                    status = wait_final(client, task_id)
            finally:
                worker.stop()
                # Before PgBouncer goes, or they would spend their stop reconnecting.
                first.stop()
                second.stop()
            assert status.state is TaskState.SUCCEEDED
            assert status.result == b"cba"
            assert "unsupported startup parameter" not in bouncer.log()

    def test_the_session_settings_hold_behind_pgbouncer(self, database_url: str) -> None:
        """The statement and idle-transaction timeouts are in force on the pooled sessions,
        the role's lock_timeout is cleared, and the backend pids the notifier compares
        with are PostgreSQL's, not PgBouncer's stand-ins."""

        async def scenario() -> tuple[list[str], int, set[int]]:
            database = connect_database(
                bouncer.url, statement_timeout=timedelta(seconds=7), pool_max_size=1
            )
            await database.connect(startup_timeout=timedelta(seconds=10))
            try:
                async with database.connection() as conn:
                    settings = [
                        await conn.fetchval(f"SHOW {name}")
                        for name in (
                            "statement_timeout",
                            "idle_in_transaction_session_timeout",
                            "lock_timeout",
                        )
                    ]
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                return settings, pid, set(database.backend_pids)
            finally:
                await database.close()

        with PgBouncer(database_url, pool_mode="session") as bouncer:
            settings, pid, tracked = asyncio.run(scenario())
        assert settings == ["7s", "21s", "0"]
        assert pid in tracked


class TestPoolersThatShareSessions:
    @pytest.mark.parametrize("pool_mode", ["transaction", "statement"])
    def test_the_server_refuses_to_start_and_says_why(
        self, database_url: str, pool_mode: str
    ) -> None:
        """Transaction and statement pooling: ConfigError at once, naming session mode;
        nothing retried for the start-up timeout."""

        with PgBouncer(database_url, pool_mode=pool_mode) as bouncer:
            started = time.monotonic()
            with pytest.raises(ConfigError, match="pool_mode = session") as refused:
                start_and_stop(bouncer.url)
            assert time.monotonic() - started < 15
        assert "shares PostgreSQL sessions between clients" in str(refused.value)

    def test_a_single_server_connection_per_pool_is_found_too(self, database_url: str) -> None:
        """With one PostgreSQL connection for all clients (default_pool_size = 1), the
        check's read waits for the other client's transaction, then runs on its backend:
        that is sharing too (the marker, set on that same backend, survives)."""

        with (
            PgBouncer(database_url, pool_mode="transaction", pool_size=1) as bouncer,
            pytest.raises(ConfigError, match="ran on the same PostgreSQL backend"),
        ):
            start_and_stop(bouncer.url)

    @pytest.mark.parametrize("pool_mode", ["transaction", "statement"])
    def test_migrate_refuses_too(self, empty_database_url: str, pool_mode: str) -> None:
        """`conveyor migrate` through them: one error line, nothing applied. Through
        transaction pooling its first run used to apply, and the next failed with
        DuplicatePreparedStatement, blamed on the role's rights; through statement pooling
        it was a traceback."""
        with PgBouncer(empty_database_url, pool_mode=pool_mode) as bouncer:
            line = assert_one_error_line(run_cli("migrate", "--database-url", bouncer.url))
        assert "pool_mode = session" in line
        assert Db(empty_database_url).fetchval("SELECT to_regclass('conveyor_tasks')") is None


class TestUrlsAPoolerRefuses:
    def test_a_setting_in_the_url_is_a_config_error_at_once(self, database_url: str) -> None:
        """`?search_path=public` is sent as a startup parameter, which PgBouncer refuses
        (08P01, like its transient refusals): a ConfigError saying where to set it, not
        a start-up timeout of retries."""

        with PgBouncer(database_url) as bouncer:
            started = time.monotonic()
            with pytest.raises(ConfigError, match=r"ALTER ROLE \.\.\. SET"):
                start_and_stop(f"{bouncer.url}?search_path=public")
            assert time.monotonic() - started < 15


def test_pgbouncer_in_front_of_a_fresh_database_migrates_it(empty_database_url: str) -> None:
    """`migrate = True` (the default) through PgBouncer: the migration's own connection
    gets its settings the same way, and the server starts on the schema it applied."""

    async def scenario() -> int:
        database = connect_database(bouncer.url, migrate=True)
        await database.connect(startup_timeout=timedelta(seconds=10))
        try:
            async with database.connection() as conn:
                return await migrate.check_schema(conn)
        finally:
            await database.close()

    with PgBouncer(empty_database_url) as bouncer:
        assert asyncio.run(scenario()) == migrate.latest_version()


def test_migrate_through_pgbouncer_names_the_session_in_its_way(database_url: str) -> None:
    """A migration blocked by a long transaction names it, through PgBouncer too: it used
    to look for what blocked the pooler's stand-in pid, found nothing, and named nobody."""
    run_sql(database_url, *BACK_TO_SCHEMA_11)

    async def scenario() -> tuple[str, int]:
        backup = await asyncpg.connect(
            database_url, server_settings={"application_name": "nightly backup"}
        )
        conn = await asyncpg.connect(bouncer.url)
        observer = await asyncpg.connect(bouncer.url)
        try:
            await backup.execute(
                "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM conveyor_tasks"
            )
            with pytest.raises(MigrationBlocked) as caught:
                await migrate.migrate(
                    conn,
                    lock_timeout=timedelta(milliseconds=200),
                    attempts=1,
                    observer=observer,
                )
            return caught.value.message, backup.get_server_pid()
        finally:
            for each in (observer, conn, backup):
                await each.close()

    with PgBouncer(database_url) as bouncer:
        message, backup_pid = asyncio.run(scenario())
    assert f"blocked by pid {backup_pid} (application 'nightly backup'" in message
