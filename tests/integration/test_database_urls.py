"""Database URLs as production writes them."""

from __future__ import annotations

import contextlib
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import pgbouncer
import pytest
from helpers import assert_ok, assert_one_error_line, run_cli, run_sql, server_argv


def test_a_socket_host_and_a_database_name_with_a_dash_and_a_dot(pg_cluster) -> None:
    """Review check (passes; untested before): `postgresql:///db?host=/path` and a
    database named `my-db.v2`: migrate applies, and runs again as up to date."""
    parts = urlsplit(pg_cluster.admin_url)
    host = parse_qs(parts.query).get("host", [None])[0]
    if host is None:
        pytest.skip("the test cluster is not on a Unix socket")
    name = f"rv-db.{uuid.uuid4().hex[:8]}"
    run_sql(pg_cluster.admin_url, f'CREATE DATABASE "{name}"')
    try:
        url = f"postgresql:///{name}?host={host}&user=postgres"
        assert "applied 0001" in assert_ok(run_cli("migrate", "--database-url", url))
        assert "up to date" in assert_ok(run_cli("migrate", "--database-url", url))
    finally:
        run_sql(pg_cluster.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_sslmode_require_against_a_server_without_ssl_is_one_error_line_at_once(
    database_url: str,
) -> None:
    """`sslmode=require` and a server that does not offer SSL: `conveyor server` and
    `conveyor migrate` each exit with one line saying which of the two to change. It was
    taken for "cannot reach PostgreSQL": the server retried for its whole start-up timeout
    (30 s), then blamed the network."""
    with contextlib.ExitStack() as stack:
        if urlsplit(database_url).hostname is None:
            # A Unix socket has no SSL to refuse: go through TCP, to a PgBouncer without
            # client TLS, which refuses it as PostgreSQL with ssl = off does.
            if not pgbouncer.available():
                pytest.skip("the test cluster is on a Unix socket and pgbouncer is missing")
            database_url = stack.enter_context(pgbouncer.PgBouncer(database_url)).url
        separator = "&" if "?" in database_url else "?"
        url = f"{database_url}{separator}sslmode=require"
        started = time.monotonic()
        for args in (("migrate", "--database-url", url), tuple(server_argv(url))):
            line = assert_one_error_line(run_cli(*args))
            assert "asks for SSL (sslmode) and the server does not offer it" in line
        assert time.monotonic() - started < 25


@pytest.mark.parametrize(
    ("netloc", "named"),
    [
        ("db.example.invalid", "host db.example.invalid "),
        ("db1.invalid:5432,db2.invalid:5433", "hosts db1.invalid, db2.invalid "),
    ],
)
def test_a_host_that_does_not_resolve_is_named(netloc: str, named: str) -> None:
    """The resolver's own words ("Name or service not known") named no host, which left a
    newcomer with a URL from a secret store guessing which part was wrong. (.invalid
    never resolves: RFC 6761.)"""
    line = assert_one_error_line(
        run_cli("migrate", "--database-url", f"postgresql://conveyor:secret@{netloc}/conveyor")
    )
    assert f"the database URL's {named}did not resolve" in line
