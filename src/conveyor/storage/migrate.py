"""Schema migrations: numbered, forward-only `.sql` files applied once and recorded in a ledger.

`migrate` takes a transaction-scoped advisory lock first, so any number of processes may run
it at once: one applies, the others wait and then find nothing left to do. `check_schema`
is what a server runs at start and on every readiness probe: it refuses an unmigrated
database, one that lacks this release's migrations, a ledger that does not match the
migration files, and a newer schema unless each newer migration recorded that servers of
this release run correctly on it (each file's `-- oldest-compatible-schema: N` header, kept
in the ledger, since a server cannot read the files of a release newer than itself).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import ConfigError, SchemaMismatch
from conveyor.storage import queries

if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.resources.abc import Traversable
    from pathlib import Path

log = logging.getLogger("conveyor.storage.migrate")

# Arbitrary but fixed: "conveyor" in ASCII, so it will not collide with an application's lock.
_MIGRATION_LOCK_KEY: Final = 0x636F6E7665796F72
_FILE_NAME: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# In a migration's leading comment block: the oldest schema version whose servers still run
# correctly once this migration is applied. Without it, only servers that know the migration
# may run on it: the safe default, since a server cannot tell what a migration it has never
# seen changed.
_COMPATIBILITY_HEADER: Final = re.compile(r"^--\s*oldest-compatible-schema:\s*(\S*)\s*$")

_LEDGER_DDL: Final = """
CREATE TABLE IF NOT EXISTS conveyor_schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
_LEDGER_EXISTS: Final = "SELECT to_regclass('conveyor_schema_migrations') IS NOT NULL"
_LEDGER_VERSIONS: Final = "SELECT version FROM conveyor_schema_migrations ORDER BY version"
# The compatibility column exists from migration 0014 on: read through to_jsonb, the same
# statement reads a ledger with or without it (NULL without).
_LEDGER_ROWS: Final = """
SELECT m.version, m.name,
       (to_jsonb(m) ->> 'oldest_compatible_schema')::integer AS oldest_compatible_schema
FROM conveyor_schema_migrations AS m
ORDER BY m.version
"""
_LEDGER_HAS_COMPATIBILITY: Final = """
SELECT EXISTS (
    SELECT FROM pg_attribute
    WHERE attrelid = 'conveyor_schema_migrations'::regclass
      AND attname = 'oldest_compatible_schema' AND NOT attisdropped
)
"""
_LEDGER_RECORD: Final = "INSERT INTO conveyor_schema_migrations (version, name) VALUES ($1, $2)"
_LEDGER_RECORD_WITH_COMPATIBILITY: Final = """
INSERT INTO conveyor_schema_migrations (version, name, oldest_compatible_schema)
VALUES ($1, $2, $3)
"""
_LOCK: Final = "SELECT pg_advisory_xact_lock($1)"
# No checksum of each file's content is recorded or compared. Databases deployed so far
# could not be checked against one: 0001, 0004, 0011 and 0012 were edited after they were
# first committed, so a database migrated by an earlier build ran other text than today's
# files, and the checksum recorded for it now would be either a claim nobody verified (the
# current files' hash) or nothing. And a mismatch found by a server at start has no remedy
# in the operator's hands: the fix is in the release (a comment reworded in a shipped file
# would stop every server). So the files are kept unchanged where that can be enforced, at
# build time: tests/unit/test_migration_files.py pins each shipped file's hash, and at run
# time the ledger must hold exactly the versions and names of the files (below).


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str
    # Servers whose own latest migration is at least this run correctly once it is applied.
    oldest_compatible_schema: int

    @property
    def label(self) -> str:
        """The file's name without `.sql`, as the CLI and logs print it."""
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True, slots=True)
class _LedgerRow:
    version: int
    name: str
    # NULL in a ledger from before 0014, and in rows it did not fill.
    oldest_compatible_schema: int | None

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


def available_migrations(migrations_dir: Path | None = None) -> list[Migration]:
    """Every migration shipped with this release (or in `migrations_dir`), in order.

    Raise ConfigError for a folder that is not a valid series: versions not 1, 2, 3...,
    a `.sql` file whose name is not `NNNN_name.sql`, a malformed compatibility header.
    """
    return list(_load_migrations(migrations_dir))


def latest_version(migrations_dir: Path | None = None) -> int:
    """The schema version this release expects."""
    return _load_migrations(migrations_dir)[-1].version


@functools.cache
def _load_migrations(migrations_dir: Path | None) -> tuple[Migration, ...]:
    # Cached: every readiness probe checks the schema against the files.
    folder: Traversable | Path = (
        resources.files("conveyor.storage").joinpath("migrations")
        if migrations_dir is None
        else migrations_dir
    )
    found = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise ConfigError(
                f"migration file {entry.name} in {folder} is not named NNNN_name.sql "
                "(four digits, then lower-case letters, digits and underscores)"
            )
        version = int(match[1])
        sql = entry.read_text(encoding="utf-8")
        oldest_compatible = _oldest_compatible(entry.name, version, sql)
        found.append(Migration(version, match[2], sql, oldest_compatible))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ConfigError(
            f"the migrations in {folder} must be numbered 1, 2, 3... without a gap or a "
            f"duplicate; found {', '.join(map(str, versions)) or 'none'}"
        )
    return tuple(found)


def _oldest_compatible(file_name: str, version: int, sql: str) -> int:
    headers = []
    for line in sql.splitlines():
        if line.strip() and not line.startswith("--"):
            break  # the leading comment block ends at the first statement
        match = _COMPATIBILITY_HEADER.match(line)
        if match:
            headers.append(match[1])
    if not headers:
        return version
    if len(headers) > 1 or not headers[0].isdigit() or not 1 <= int(headers[0]) <= version:
        raise ConfigError(
            f"migration {file_name}: its header must hold one line "
            f"'-- oldest-compatible-schema: N' with N from 1 to {version}"
        )
    return int(headers[0])


async def applied_versions(conn: Any) -> list[int]:
    """Versions recorded in the ledger; empty when the database was never migrated."""
    if not await conn.fetchval(_LEDGER_EXISTS):
        return []
    return [row["version"] for row in await conn.fetch(_LEDGER_VERSIONS)]


async def _ledger(conn: Any) -> list[_LedgerRow]:
    if not await conn.fetchval(_LEDGER_EXISTS):
        return []
    return [
        _LedgerRow(row["version"], row["name"], row["oldest_compatible_schema"])
        for row in await conn.fetch(_LEDGER_ROWS)
    ]


async def migrate(
    conn: Any,
    *,
    migrations_dir: Path | None = None,
) -> list[Migration]:
    """Apply every pending migration in one transaction; return those applied.

    A newer schema that this release may run on (see `check_schema`) has nothing to apply.
    Then, if any was applied, refresh the task table's planner statistics.
    """
    pending = await _apply_pending(conn, available_migrations(migrations_dir))
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


async def _apply_pending(conn: Any, migrations: Sequence[Migration]) -> list[Migration]:
    async with conn.transaction():
        await conn.execute(_LOCK, _MIGRATION_LOCK_KEY)
        await conn.execute(_LEDGER_DDL)
        ledger = await _ledger(conn)
        latest = migrations[-1].version
        if ledger:
            _check_ledger(ledger, migrations)
            highest = ledger[-1].version
            if highest > latest:
                incompatible = _incompatible(ledger, latest)
                if incompatible:
                    raise SchemaMismatch(
                        _newer_message(highest, latest, incompatible)
                        + ": upgrade Conveyor instead of migrating"
                    )
                return []
        done = ledger[-1].version if ledger else 0
        # The ledger was checked to hold exactly 1..done: what is left comes after it.
        pending = [m for m in migrations if m.version > done]
        for migration in pending:
            await conn.execute(migration.sql)
            if await conn.fetchval(_LEDGER_HAS_COMPATIBILITY):
                await conn.execute(
                    _LEDGER_RECORD_WITH_COMPATIBILITY,
                    migration.version,
                    migration.name,
                    migration.oldest_compatible_schema,
                )
            else:
                await conn.execute(_LEDGER_RECORD, migration.version, migration.name)
        return pending


async def check_schema(conn: Any, *, migrations_dir: Path | None = None) -> int:
    """Return the database's schema version; SchemaMismatch if this release cannot run on it.

    It can when the ledger holds exactly this release's migrations (same versions, same
    names), or those and newer ones each recorded as compatible with this release's
    schema. It cannot on an unmigrated database, one missing some of this release's
    migrations, or a ledger with a gap or another name for a version.
    """
    ledger = await _ledger(conn)
    migrations = available_migrations(migrations_dir)
    expected = migrations[-1].version
    if not ledger:
        raise SchemaMismatch(
            "the database has no Conveyor schema: run `conveyor migrate` "
            "(or start the server with --migrate)"
        )
    _check_ledger(ledger, migrations)
    current = ledger[-1].version
    if current < expected:
        raise SchemaMismatch(
            f"the database schema is version {current}, older than this Conveyor expects "
            f"({expected}): run `conveyor migrate` (or start the server with --migrate)"
        )
    if current > expected:
        incompatible = _incompatible(ledger, expected)
        if incompatible:
            raise SchemaMismatch(
                _newer_message(current, expected, incompatible) + ": upgrade Conveyor"
            )
    return current


def _check_ledger(ledger: Sequence[_LedgerRow], migrations: Sequence[Migration]) -> None:
    """Refuse a ledger that is not exactly versions 1..highest, named as the files are."""
    recorded = {row.version for row in ledger}
    highest = ledger[-1].version
    missing = [version for version in range(1, highest + 1) if version not in recorded]
    if missing or ledger[0].version < 1:
        lacking = f" (it lacks {_ranges(missing)})" if missing else ""
        raise SchemaMismatch(
            f"the database's migration ledger (conveyor_schema_migrations) records versions "
            f"{_ranges([row.version for row in ledger])}, not 1 to {highest}{lacking}: "
            "migrations are applied in order, so the database was not migrated by `conveyor "
            "migrate` alone (a partial restore, an edited ledger); compare its schema with the "
            "migration files and repair the ledger before running a server or migrating"
        )
    named = {m.version: m.name for m in migrations}
    for row in ledger:
        expected = named.get(row.version)
        if expected is not None and row.name != expected:
            raise SchemaMismatch(
                f"the database's migration ledger records version {row.version} as "
                f"{row.label}, but this Conveyor's migration {row.version} is "
                f"{row.version:04d}_{expected}: the database was migrated by another "
                "build of Conveyor, numbered differently; its schema is not this one's"
            )


def _incompatible(ledger: Sequence[_LedgerRow], latest: int) -> list[_LedgerRow]:
    """The applied migrations newer than `latest` that servers of `latest` may not run on."""
    return [
        row
        for row in ledger
        if row.version > latest
        and (row.oldest_compatible_schema is None or row.oldest_compatible_schema > latest)
    ]


def _newer_message(current: int, expected: int, incompatible: Sequence[_LedgerRow]) -> str:
    first = incompatible[0]
    needs = (
        f"it needs servers of schema {first.oldest_compatible_schema} or newer"
        if first.oldest_compatible_schema is not None
        else "its ledger row does not say which servers can run on it"
    )
    others = f" (and {len(incompatible) - 1} more)" if len(incompatible) > 1 else ""
    return (
        f"the database schema is version {current}, newer than this Conveyor expects "
        f"({expected}), and migration {first.label}{others} is not compatible with this "
        f"release ({needs})"
    )


def _ranges(versions: Sequence[int]) -> str:
    """`1-4, 6, 9-10` for [1, 2, 3, 4, 6, 9, 10]."""
    spans: list[list[int]] = []
    for version in sorted(versions):
        if spans and version == spans[-1][1] + 1:
            spans[-1][1] = version
        else:
            spans.append([version, version])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
