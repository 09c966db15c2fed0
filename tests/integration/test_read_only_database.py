"""A database that takes no writes: a standby, a demoted primary, a read-only default.

Servers connect only to a writable PostgreSQL (asyncpg's target_session_attrs=read-write
unless the URL says otherwise), so a URL listing a primary and its standbys reaches
whichever is the primary; and /readyz answers 503 while the session it checks is read-only,
instead of 200 with every write failing.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from helpers import Db, assert_ok, get_json, run_cli, run_sql, wait_for
from pgbouncer import PgBouncer, available

from conveyor import Client, Task
from conveyor.errors import ServerUnavailable
from conveyor.server.config import ServerConfig
from conveyor.server.database import Database


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def read_only_by_default(url: str) -> None:
    """New sessions of `url`'s database start read-only, as on a standby."""
    run_sql(url, f'ALTER DATABASE "{database_name(url)}" SET default_transaction_read_only = on')


def two_hosts(first_port: int, url: str) -> str:
    """`url` listing 127.0.0.1:`first_port` first, then its own host, as a URL naming a
    primary and its standby does."""
    parts = urlsplit(url)
    host = parse_qs(parts.query).get("host", [parts.hostname or ""])[0]
    return (
        f"postgresql://{parts.username}@/{database_name(url)}"
        f"?host=127.0.0.1,{host}&port={first_port},{parts.port or 5432}"
    )


@pytest.mark.skipif(not available(), reason="pgbouncer is not installed")
def test_a_url_whose_first_host_is_read_only_serves_from_the_writable_one(
    database_url: str, empty_database_url: str, start_server
) -> None:
    """The URL lists the old primary, now read-only (a PgBouncer leading to a database
    whose sessions are read-only, as a standby's are), then the new one: the server uses
    the second. It used to take the first that answered, and every write failed there."""
    read_only_by_default(empty_database_url)
    with PgBouncer(empty_database_url, serve_database=database_name(empty_database_url)) as old:
        server = start_server(database_url=two_hosts(old.port, database_url))
        try:
            assert get_json(f"{server.http_url}/readyz")[0] == 200
            with Client(server.address) as client:
                task_id = client.enqueue_task(Task(type="t", payload=b"x"))
        finally:
            server.stop()
    assert Db(database_url).task(task_id)["state"] == "queued"


@pytest.mark.skipif(not available(), reason="pgbouncer is not installed")
def test_migrate_through_such_a_url_migrates_the_writable_host(
    database_url: str, empty_database_url: str
) -> None:
    """`conveyor migrate` takes the same URL the servers do, and migrates the primary: it
    used to connect to the first host that answered, and fail there as read-only."""
    read_only_by_default(database_url)
    with PgBouncer(database_url, serve_database=database_name(database_url)) as old:
        url = two_hosts(old.port, empty_database_url)
        assert "applied 0001" in assert_ok(run_cli("migrate", "--database-url", url))
    assert Db(empty_database_url).fetchval("SELECT to_regclass('conveyor_tasks')") is not None


def test_readyz_is_503_while_its_session_is_read_only(start_server) -> None:
    """The pool's one session turns read-only (a primary demoted under it): /readyz says
    so with 503, and drops that session, so the next check, on a new one, is ready."""
    server = start_server(pool_max_size=1)

    async def demote() -> None:
        async with server.server.database.connection() as conn:
            await conn.execute("SET default_transaction_read_only = on")

    server.call(demote)
    status, document = get_json(f"{server.http_url}/readyz")
    assert status == 503
    assert "PostgreSQL is read-only" in document["checks"]["database"]
    assert get_json(f"{server.http_url}/readyz")[0] == 200


def test_readyz_is_503_while_new_sessions_are_read_only(
    pg_cluster, database_url: str, start_server
) -> None:
    """Every new session is read-only (the URL now leads to a standby) and the server's are
    gone: /readyz is 503 naming the reason until the database takes writes again."""
    server = start_server(pool_max_size=1, db_breaker_reset=timedelta(seconds=0.2))
    read_only_by_default(database_url)
    run_sql(
        database_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )

    def not_ready_for_read_only() -> bool:
        status, document = get_json(f"{server.http_url}/readyz")
        return status == 503 and "PostgreSQL is read-only" in document["checks"]["database"]

    wait_for(not_ready_for_read_only, timeout=10, what="/readyz to report the read-only database")
    # From another database: this one's sessions can change nothing now.
    run_sql(pg_cluster.admin_url, f'ALTER DATABASE "{database_name(database_url)}" RESET ALL')
    wait_for(
        lambda: get_json(f"{server.http_url}/readyz")[0] == 200,
        timeout=10,
        what="/readyz once the database takes writes",
    )


def test_starting_on_a_read_only_database_says_so(database_url: str) -> None:
    """Start-up retries while the only host is read-only (a failover may promote it), then
    gives up naming the reason rather than "cannot reach PostgreSQL"."""
    read_only_by_default(database_url)

    async def scenario() -> None:
        database = Database(ServerConfig(database_url=database_url))
        try:
            await database.connect(startup_timeout=timedelta(seconds=1))
        finally:
            await database.close()

    with pytest.raises(ServerUnavailable, match="PostgreSQL is read-only"):
        asyncio.run(scenario())
