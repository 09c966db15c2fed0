"""Database URLs as production writes them."""

from __future__ import annotations

import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
from helpers import assert_ok, run_cli, run_sql


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
