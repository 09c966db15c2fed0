"""Schema migrations: numbered, forward-only `.sql` files applied once and recorded in a ledger.

`migrate` takes a transaction-scoped advisory lock first, so any number of processes may run
it at once: one applies, the others wait and then find nothing left to do. `check_schema` is
what a server runs at start: it refuses an unmigrated database and one migrated by a newer
Conveyor, instead of failing later on a missing column.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from conveyor.errors import SchemaMismatch
from conveyor.storage import queries

log = logging.getLogger("conveyor.storage.migrate")

# Arbitrary but fixed: "conveyor" in ASCII, so it will not collide with an application's lock.
_MIGRATION_LOCK_KEY: Final = 0x636F6E7665796F72
_FILE_NAME: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_LEDGER_DDL: Final = """
CREATE TABLE IF NOT EXISTS conveyor_schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
_LEDGER_EXISTS: Final = "SELECT to_regclass('conveyor_schema_migrations') IS NOT NULL"
_LEDGER_VERSIONS: Final = "SELECT version FROM conveyor_schema_migrations ORDER BY version"
_LEDGER_RECORD: Final = "INSERT INTO conveyor_schema_migrations (version, name) VALUES ($1, $2)"
_LOCK: Final = "SELECT pg_advisory_xact_lock($1)"


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """Every migration shipped with this release, in order."""
    folder = resources.files("conveyor.storage").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    return found


def latest_version() -> int:
    """The schema version this release expects."""
    return available_migrations()[-1].version


async def applied_versions(conn: Any) -> list[int]:
    """Versions recorded in the ledger; empty when the database was never migrated."""
    if not await conn.fetchval(_LEDGER_EXISTS):
        return []
    return [row["version"] for row in await conn.fetch(_LEDGER_VERSIONS)]


async def migrate(conn: Any) -> list[Migration]:
    """Apply every pending migration in one transaction; return those applied.

    Then, if any was applied, refresh the task table's planner statistics.
    """
    pending = await _apply_pending(conn)
    if pending:
        # After the migrations commit: one may change what the planner should know of the
        # task table (0011 pins an estimate that counts from the next ANALYZE). Outside
        # their transaction it takes only a SHARE UPDATE EXCLUSIVE lock.
        try:
            await queries.task_table_analyze(conn)
        except Exception as exc:
            log.warning(
                "migrations applied, but ANALYZE conveyor_tasks failed (%s): autovacuum "
                "will run it, or run it yourself",
                exc,
            )
    return pending


async def _apply_pending(conn: Any) -> list[Migration]:
    async with conn.transaction():
        await conn.execute(_LOCK, _MIGRATION_LOCK_KEY)
        await conn.execute(_LEDGER_DDL)
        done = set(await applied_versions(conn))
        newer = [v for v in done if v > latest_version()]
        if newer:
            raise SchemaMismatch(
                f"the database has schema version {max(newer)}, newer than this Conveyor "
                f"({latest_version()}); upgrade Conveyor instead of migrating"
            )
        pending = [m for m in available_migrations() if m.version not in done]
        for migration in pending:
            await conn.execute(migration.sql)
            await conn.execute(_LEDGER_RECORD, migration.version, migration.name)
        return pending


async def check_schema(conn: Any) -> int:
    """Return the schema version, or raise SchemaMismatch if it is not this release's."""
    versions = await applied_versions(conn)
    expected = latest_version()
    if not versions:
        raise SchemaMismatch(
            "the database has no Conveyor schema: run `conveyor migrate` "
            "(or start the server with --migrate)"
        )
    current = max(versions)
    if current > expected:
        raise SchemaMismatch(
            f"the database schema is version {current}, newer than this Conveyor expects "
            f"({expected}): upgrade Conveyor"
        )
    if current < expected:
        raise SchemaMismatch(
            f"the database schema is version {current}, older than this Conveyor expects "
            f"({expected}): run `conveyor migrate` (or start the server with --migrate)"
        )
    return current
