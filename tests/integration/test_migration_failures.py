"""`conveyor migrate` refused by PostgreSQL: one `error:` line naming why, nothing applied.

Only a lock wait was caught; any other database error inside a migration ended in an
asyncpg traceback, and a ledger emptied while the tables stayed (a partial restore) ran
0001 again, to die on its first CREATE.
"""

from __future__ import annotations

import uuid

from helpers import BACK_TO_SCHEMA_11, Db, assert_one_error_line, run_cli, run_sql, with_user

LEDGER = "SELECT version FROM conveyor_schema_migrations ORDER BY version"


def test_tables_without_a_ledger_are_refused(database_url) -> None:
    db = Db(database_url)
    db.execute("DELETE FROM conveyor_schema_migrations")
    line = assert_one_error_line(run_cli("migrate", "--database-url", database_url))
    assert "Conveyor's tables exist but the migration ledger" in line, line
    assert line.endswith("nothing was applied"), line
    assert db.fetch(LEDGER) == []


def test_a_role_that_does_not_own_the_tables_is_told_so(database_url, pg_cluster) -> None:
    """The deploy job migrates as the application's role, and the tables belong to another:
    PostgreSQL refuses 0012's DROP INDEX (must be owner)."""
    for statement in BACK_TO_SCHEMA_11:
        run_sql(database_url, statement)
    role = f"conveyor_not_owner_{uuid.uuid4().hex[:8]}"
    run_sql(
        database_url,
        f'CREATE ROLE "{role}" LOGIN',
        f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"',
        f'GRANT ALL ON SCHEMA public TO "{role}"',
    )
    try:
        result = run_cli("migrate", "--database-url", with_user(database_url, role))
        line = assert_one_error_line(result)
        assert "migration 0012" in line, line
        assert "must be owner" in line, line
        assert line.endswith("nothing was applied"), line
        versions = [row["version"] for row in Db(database_url).fetch(LEDGER)]
        assert versions == list(range(1, 12))
    finally:
        run_sql(database_url, f'DROP OWNED BY "{role}"')
        run_sql(pg_cluster.admin_url, f'DROP ROLE IF EXISTS "{role}"')
