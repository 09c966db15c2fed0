"""Which schemas a server runs on: its own, a newer one that says it may, nothing else.

A rolling upgrade migrates first and replaces the servers afterwards, so servers of the
previous release meet a newer schema. They stay ready (and may restart) when every newer
migration recorded in the ledger that they run correctly on it, and go unready with the
reason otherwise. "A newer release" is played by this release's migrations plus one more,
in a folder of the test's own; the servers are real servers of this release on a real
PostgreSQL. The ledger itself must hold exactly the migrations' versions and names.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import Db, migrate_with, wait_final

from conveyor import Client, Task, TaskState
from conveyor.errors import SchemaMismatch
from conveyor.storage import migrate

THIS_RELEASE = migrate.latest_version()
NEXT = THIS_RELEASE + 1

# The oldest schema whose servers each migration is recorded as tolerating: its own
# version (no older server), except those below. 0014 fills in 0001-0013 (its comments say
# why each), and its own header says 13.
RECORDED_COMPATIBILITY = {version: version for version in range(1, 17)} | {
    3: 2,
    6: 5,
    9: 8,
    10: 9,
    11: 10,
    12: 11,
    13: 12,
    14: 13,
    16: 15,
}


def readyz(server: Any) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{server.http_url}/readyz", timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def next_release(folder: Path, migration_sql: str, name: str) -> Path:
    """A folder with this release's migrations and one more, numbered NEXT."""
    shipped = resources.files("conveyor.storage").joinpath("migrations")
    folder.mkdir()
    for entry in shipped.iterdir():
        if entry.name.endswith(".sql"):
            (folder / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / f"{NEXT:04d}_{name}.sql").write_text(migration_sql, encoding="utf-8")
    return folder


def compatible_release(tmp_path: Path) -> Path:
    """The next release adds a table; servers of this release never look at it."""
    return next_release(
        tmp_path / "compatible",
        f"-- oldest-compatible-schema: {THIS_RELEASE}\n"
        "-- A table the previous release does not know, and does not need to.\n"
        "CREATE TABLE conveyor_test_next_release (id integer PRIMARY KEY);\n",
        "adds_a_table",
    )


def incompatible_release(tmp_path: Path) -> Path:
    """The next release changes something servers of this release rely on: no header."""
    return next_release(
        tmp_path / "incompatible",
        "-- Servers of the previous release would misbehave on this.\n"
        "ALTER TABLE conveyor_workers ADD COLUMN zone text;\n",
        "needs_new_servers",
    )


def check_with(url: str) -> int:
    """What this release's `check_schema` says of the database."""

    async def go() -> int:
        conn = await asyncpg.connect(url)
        try:
            return await migrate.check_schema(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


def ledger_rows(db: Db) -> dict[int, tuple[str, int]]:
    return {
        row["version"]: (row["name"], row["oldest_compatible_schema"])
        for row in db.fetch("SELECT * FROM conveyor_schema_migrations ORDER BY version")
    }


class TestNewerSchema:
    def test_a_server_stays_ready_and_restarts_on_a_compatible_newer_schema(
        self, start_server, database_url, tmp_path
    ) -> None:
        """Before: once the newer release migrated, /readyz answered 503 ("newer than this
        Conveyor expects") and a restarted server refused to start, taking the whole fleet
        out of rotation mid-upgrade."""
        server = start_server()
        assert readyz(server)[0] == 200
        assert migrate_with(database_url, compatible_release(tmp_path)) == [NEXT]

        status, document = readyz(server)
        assert status == 200, document
        assert document["checks"]["schema_version"] == NEXT

        server.stop()
        restarted = start_server()
        status, document = readyz(restarted)
        assert status == 200, document
        with Client(restarted.address) as client:
            task_id = client.enqueue_task(Task(type="upgrade.t"))
            client.cancel_task(task_id)
            assert wait_final(client, task_id).state is TaskState.CANCELLED

    def test_a_server_goes_unready_on_an_incompatible_newer_schema(
        self, start_server, database_url, tmp_path
    ) -> None:
        """A newer migration without the header: servers of this release must not serve."""
        server = start_server()
        assert migrate_with(database_url, incompatible_release(tmp_path)) == [NEXT]

        status, document = readyz(server)
        assert status == 503
        assert document["ready"] is False
        reason = document["checks"]["database"]
        assert f"schema is version {NEXT}, newer than this Conveyor expects ({THIS_RELEASE})" in (
            reason
        )
        assert f"migration {NEXT:04d}_needs_new_servers is not compatible" in reason
        assert reason.endswith("upgrade Conveyor")

        with pytest.raises(SchemaMismatch, match=f"{NEXT:04d}_needs_new_servers"):
            start_server()

    def test_a_server_refuses_an_older_schema(self, start_server, db) -> None:
        """It needs migrations the database lacks: unready at once, and no start."""
        server = start_server()
        db.execute("DELETE FROM conveyor_schema_migrations WHERE version = $1", THIS_RELEASE)

        status, document = readyz(server)
        assert status == 503
        assert document["checks"]["database"] == (
            f"the database schema is version {THIS_RELEASE - 1}, older than this Conveyor "
            f"expects ({THIS_RELEASE}): run `conveyor migrate` (or start the server with "
            "--migrate)"
        )
        with pytest.raises(SchemaMismatch, match="older"):
            start_server()

    def test_migrating_with_this_release_leaves_a_compatible_newer_schema_alone(
        self, start_server, database_url, tmp_path
    ) -> None:
        """`conveyor migrate` or `server --migrate` of the older release (a rollback, or a
        deploy job that runs both) has nothing to apply; on an incompatible schema it
        refuses, as before."""
        migrate_with(database_url, compatible_release(tmp_path))
        assert migrate_with(database_url, None) == []
        status, document = readyz(start_server(migrate=True))
        assert status == 200, document
        assert document["checks"]["schema_version"] == NEXT

    def test_migrate_refuses_an_incompatible_newer_schema(self, database_url, tmp_path) -> None:
        migrate_with(database_url, incompatible_release(tmp_path))
        with pytest.raises(SchemaMismatch, match="upgrade Conveyor instead of migrating"):
            migrate_with(database_url, None)


class TestLedgerRecordsCompatibility:
    def test_a_new_database_records_each_migrations_compatibility(self, empty_database_url) -> None:
        migrate_with(empty_database_url, None)
        rows = ledger_rows(Db(empty_database_url))
        assert {version: oldest for version, (_, oldest) in rows.items()} == (
            RECORDED_COMPATIBILITY
        )

    def test_upgrading_from_schema_13_records_the_same(self, database_url, db) -> None:
        """0014 fills in the rows of the migrations before it, as a new database gets them."""
        db.execute("ALTER TABLE conveyor_schema_migrations DROP COLUMN oldest_compatible_schema")
        # 0015 and 0016 are written to be applied again (what they add exists already).
        db.execute("DELETE FROM conveyor_schema_migrations WHERE version >= 14")
        assert migrate_with(database_url, None) == [14, 15, 16]
        rows = ledger_rows(db)
        assert {version: oldest for version, (_, oldest) in rows.items()} == (
            RECORDED_COMPATIBILITY
        )

    def test_a_migrations_header_is_what_the_ledger_records(
        self, database_url, db, tmp_path
    ) -> None:
        migrate_with(database_url, compatible_release(tmp_path))
        assert ledger_rows(db)[NEXT] == ("adds_a_table", THIS_RELEASE)


class TestLedgerMustMatchTheFiles:
    def test_a_gap_in_the_ledger_is_refused(self, start_server, database_url, db) -> None:
        """Before: only max(version) was compared, so a server started on a database that
        lacked 0005, and migrate() then applied 0005 after 0013 (and failed half way)."""
        db.execute("DELETE FROM conveyor_schema_migrations WHERE version = 5")
        expected = f"records versions 1-4, 6-{THIS_RELEASE}, not 1 to {THIS_RELEASE} (it lacks 5)"
        with pytest.raises(SchemaMismatch, match=re.escape(expected)):
            check_with(database_url)
        with pytest.raises(SchemaMismatch, match=re.escape(expected)):
            start_server()
        with pytest.raises(SchemaMismatch, match=re.escape(expected)):
            migrate_with(database_url, None)
        # Nothing applied out of order: 0005's constraint change was not run again.
        assert 5 not in ledger_rows(db)

    def test_a_gap_among_newer_migrations_is_refused(self, database_url, db, tmp_path) -> None:
        migrate_with(database_url, compatible_release(tmp_path))
        db.execute(
            "INSERT INTO conveyor_schema_migrations (version, name, oldest_compatible_schema) "
            "VALUES ($1, 'later', $2)",
            NEXT + 2,
            THIS_RELEASE,
        )
        with pytest.raises(SchemaMismatch, match=f"it lacks {NEXT + 1}"):
            check_with(database_url)

    def test_a_ledger_numbered_differently_is_refused(self, start_server, database_url, db) -> None:
        """Before: names were recorded but never read; a development build that numbered
        0005 and 0006 the other way round passed the check."""
        db.execute("UPDATE conveyor_schema_migrations SET name = 'bulk_enqueue' WHERE version = 5")
        expected = (
            "records version 5 as 0005_bulk_enqueue, but this Conveyor's migration 5 is "
            "0005_lean_history"
        )
        with pytest.raises(SchemaMismatch, match=re.escape(expected)):
            check_with(database_url)
        with pytest.raises(SchemaMismatch, match=re.escape(expected)):
            start_server()
        with pytest.raises(SchemaMismatch, match=re.escape(expected)):
            migrate_with(database_url, None)
