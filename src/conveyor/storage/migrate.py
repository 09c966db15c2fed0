"""Schema migrations: numbered, forward-only `.sql` files applied once and recorded in a ledger.

`migrate` takes a transaction-scoped advisory lock first, so any number of processes may run
it at once: one applies, the others wait and then find nothing left to do. It waits for a
table lock a few seconds at a time (every claim and enqueue queues behind a waiting
migration), retries, and gives up naming the sessions in its way. `check_schema` is what a
server runs at start and on every readiness probe: it refuses an unmigrated database, one
that lacks this release's migrations, a ledger that does not match the migration files, and
a newer schema unless each newer migration recorded that servers of this release run
correctly on it (each file's `-- oldest-compatible-schema: N` header, kept in the ledger,
since a server cannot read the files of a release newer than itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from conveyor.errors import ConfigError, MigrationBlocked, MigrationFailed, SchemaMismatch
from conveyor.storage import queries

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
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
# The oldest PostgreSQL major version a server or `conveyor migrate` runs on.
MIN_POSTGRES_MAJOR: Final = 15

# A migration waits this long for a table lock before its transaction is rolled back and
# tried again: every claim, enqueue and report on that table queues behind the waiting
# migration, so the wait is the longest the queue stalls for each attempt.
DEFAULT_LOCK_TIMEOUT: Final = timedelta(seconds=2)
# PostgreSQL's own bound for `lock_timeout` (INT_MAX milliseconds, about 24.8 days): a longer
# one failed the migration with the server's "outside the valid range" error.
LONGEST_LOCK_TIMEOUT: Final = timedelta(milliseconds=2**31 - 1)
# Attempts before giving up. Between them the migration waits as long as its lock timeout,
# then twice that, and so on (capped), while traffic flows: with the defaults, the queue
# stalls for at most 10 s spread over about 40 s before `migrate` fails.
DEFAULT_LOCK_ATTEMPTS: Final = 5
_LONGEST_RETRY_DELAY: Final = 30.0
# How often a second session looks at what the migration waits for, to name it on failure.
_BLOCKER_SAMPLE_SECONDS: Final = 0.25

_LEDGER_DDL: Final = """
CREATE TABLE IF NOT EXISTS conveyor_schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
_LEDGER_EXISTS: Final = "SELECT to_regclass('conveyor_schema_migrations') IS NOT NULL"
_TASKS_EXIST: Final = "SELECT to_regclass('conveyor_tasks') IS NOT NULL"
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
_SET_LOCK_TIMEOUT: Final = "SELECT set_config('lock_timeout', $1, true)"
# Who holds what the migration's session waits for. Without pg_read_all_stats, the state and
# times of another role's sessions read as NULL.
_BLOCKERS: Final = """
SELECT a.pid, a.application_name, a.state,
       extract(epoch FROM now() - a.xact_start)::float8 AS transaction_seconds
FROM pg_stat_activity AS a
WHERE a.pid = ANY (pg_blocking_pids($1))
ORDER BY a.pid
"""

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


@dataclass(frozen=True, slots=True)
class Blocker:
    """A session holding a lock a migration waited for."""

    pid: int
    application_name: str | None
    state: str | None
    transaction_seconds: float | None

    def describe(self) -> str:
        """`pid 123 (application 'pg_dump', idle in transaction, transaction open 2 h 5 min)`."""
        details = [f"application {self.application_name!r}" if self.application_name else None]
        details.append(self.state)
        if self.transaction_seconds is not None:
            details.append(f"transaction open {_duration(self.transaction_seconds)}")
        known = [detail for detail in details if detail]
        return f"pid {self.pid}" + (f" ({', '.join(known)})" if known else "")


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
    lock_timeout: timedelta = DEFAULT_LOCK_TIMEOUT,
    attempts: int = DEFAULT_LOCK_ATTEMPTS,
    observer: Any = None,
) -> list[Migration]:
    """Apply every pending migration in one transaction; return those applied.

    Each attempt waits at most `lock_timeout` for any table lock; after `attempts` such
    waits it raises MigrationBlocked, having applied nothing. `observer`, a second
    connection to the same database, names the sessions it waited for in that error. A
    newer schema that this release may run on (see `check_schema`) has nothing to apply.
    Then, if any was applied, refresh the task table's planner statistics.
    """
    if not timedelta(0) < lock_timeout <= LONGEST_LOCK_TIMEOUT or attempts < 1:
        raise ConfigError(
            "the lock timeout must be positive and at most "
            f"{LONGEST_LOCK_TIMEOUT.total_seconds()} s (PostgreSQL's limit), and the "
            "attempts at least 1"
        )
    check_postgres_version(conn)
    migrations = available_migrations(migrations_dir)
    pending = await _apply_with_retries(conn, migrations, lock_timeout, attempts, observer)
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


class _LockWaitTimedOut(Exception):
    def __init__(self, waiting: str) -> None:
        super().__init__(waiting)
        self.waiting = waiting


async def _apply_with_retries(
    conn: Any,
    migrations: Sequence[Migration],
    lock_timeout: timedelta,
    attempts: int,
    observer: Any,
) -> list[Migration]:
    blockers: list[Blocker] = []
    delay = lock_timeout.total_seconds()
    for attempt in range(1, attempts + 1):
        try:
            async with _watching_blockers(observer, conn, lock_timeout, blockers):
                return await _apply_pending(conn, migrations, lock_timeout)
        except _LockWaitTimedOut as timed_out:
            if attempt == attempts:
                raise MigrationBlocked(
                    _blocked_message(timed_out.waiting, lock_timeout, attempts, blockers)
                ) from None
            log.warning(
                "%s waited %s for a lock (attempt %d of %d); nothing applied, trying again "
                "in %.1f s",
                timed_out.waiting,
                _duration(lock_timeout.total_seconds()),
                attempt,
                attempts,
                delay,
                extra={"event": "migration_lock_timeout"},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LONGEST_RETRY_DELAY)
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _apply_pending(
    conn: Any, migrations: Sequence[Migration], lock_timeout: timedelta
) -> list[Migration]:
    waiting = "the migration ledger"
    try:
        async with conn.transaction():
            # The advisory lock first, with no lock timeout: another `migrate` holding it
            # may be applying a long migration, and this one has to wait for it.
            await conn.execute(_LOCK, _MIGRATION_LOCK_KEY)
            await conn.execute(_SET_LOCK_TIMEOUT, f"{queries.milliseconds(lock_timeout)}ms")
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
            elif await conn.fetchval(_TASKS_EXIST):
                # Running 0001 again failed on its first CREATE, as a traceback.
                raise SchemaMismatch(
                    "Conveyor's tables exist but the migration ledger "
                    "(conveyor_schema_migrations) is empty: a partial restore, or a ledger "
                    "truncated by hand? Restore the ledger's rows with the tables; nothing "
                    "was applied"
                )
            done = ledger[-1].version if ledger else 0
            # The ledger was checked to hold exactly 1..done: what is left comes after it.
            pending = [m for m in migrations if m.version > done]
            for migration in pending:
                waiting = f"migration {migration.label}"
                await _run(conn, migration)
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
    except asyncpg.LockNotAvailableError:
        raise _LockWaitTimedOut(waiting) from None
    except asyncpg.PostgresConnectionError:
        raise
    except asyncpg.PostgresError as exc:
        # Refused before any migration ran (a migration's own refusal is MigrationFailed
        # already, from `_run`): creating or reading the ledger, as a role without CREATE
        # on the schema (PostgreSQL 15's default for `public`) or a read-only session is.
        # It was an asyncpg traceback.
        raise MigrationFailed(
            f"PostgreSQL refused {waiting}: {exc} (SQLSTATE {exc.sqlstate}); nothing "
            "was applied. The role that migrates needs CREATE on the schema (or to own "
            "the database) and a read-write session"
        ) from None


async def _run(conn: Any, migration: Migration) -> None:
    """Run one migration's statements; MigrationFailed, naming it, if PostgreSQL refuses.

    The whole run is one transaction, so a refusal applies nothing: not this migration,
    nor those before it in the run. A lock wait that timed out is left to the caller,
    which tries again.
    """
    try:
        await conn.execute(migration.sql)
    except asyncpg.LockNotAvailableError:
        raise
    except asyncpg.PostgresError as exc:
        # As the CLI and a server starting with --migrate say it: one line, no traceback
        # (the role not owning the tables was the common case, as a deploy job's).
        raise MigrationFailed(
            f"migration {migration.label} failed: {exc} (SQLSTATE {exc.sqlstate}); "
            "nothing was applied"
        ) from exc


@contextlib.asynccontextmanager
async def _watching_blockers(
    observer: Any, conn: Any, lock_timeout: timedelta, seen: list[Blocker]
) -> AsyncIterator[None]:
    """While the block runs, keep in `seen` the last sessions found blocking `conn`.

    A lock wait that timed out has ended, and with it what pg_blocking_pids could tell: so
    another session samples it while it lasts.
    """
    if observer is None:
        yield
        return
    # PostgreSQL's pid for the session, not get_server_pid(): behind a pooler that is the
    # pooler's stand-in, which pg_blocking_pids knows nothing of.
    pid = await queries.session_backend_pid(conn)
    interval = min(_BLOCKER_SAMPLE_SECONDS, lock_timeout.total_seconds() / 4)
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            rows = await observer.fetch(_BLOCKERS, pid)
            if rows:
                seen[:] = [
                    Blocker(r["pid"], r["application_name"], r["state"], r["transaction_seconds"])
                    for r in rows
                ]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        stop.set()
        try:
            await watcher
        except Exception as exc:
            # Only the error message loses its detail: the migration's outcome stands.
            log.debug("could not look for the sessions blocking the migration: %s", exc)


def _blocked_message(
    waiting: str, lock_timeout: timedelta, attempts: int, blockers: Sequence[Blocker]
) -> str:
    waits = (
        f"{attempts} waits of {_duration(lock_timeout.total_seconds())} each timed out"
        if attempts > 1
        else f"a wait of {_duration(lock_timeout.total_seconds())} timed out"
    )
    if blockers:
        them = "it" if len(blockers) == 1 else "them"
        terminate = ", ".join(f"pg_terminate_backend({blocker.pid})" for blocker in blockers)
        who = (
            f"blocked by {'; '.join(blocker.describe() for blocker in blockers)}: let {them} "
            f"finish (a backup, a long query) or end {them} with SELECT {terminate}, then "
            "migrate again"
        )
    else:
        who = (
            "the sessions in its way were not identified (look in pg_locks for those holding "
            "Conveyor's tables); migrate again once no long transaction uses them"
        )
    return (
        f"{waiting} could not get its table lock: {waits} (claims and enqueues queue behind "
        f"a waiting migration, so it waits no longer), nothing was applied; {who}"
    )


async def check_schema(conn: Any, *, migrations_dir: Path | None = None) -> int:
    """Return the database's schema version; SchemaMismatch if this release cannot run on it.

    It can when the ledger holds exactly this release's migrations (same versions, same
    names), or those and newer ones each recorded as compatible with this release's
    schema. It cannot on an unmigrated database, one missing some of this release's
    migrations, or a ledger with a gap or another name for a version.
    """
    check_postgres_version(conn)
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


def check_postgres_version(conn: Any) -> None:
    """ConfigError unless the database is PostgreSQL `MIN_POSTGRES_MAJOR` or newer.

    15 is the oldest major version still supported by the PostgreSQL project (13 ended in
    November 2025, 14 in November 2026) and the oldest Conveyor is tested on. Older ones
    fail in ways found late: the stats sampler's `date_bin` is 14's, so on 13 every
    sample failed and /status, the queue gauges and `conveyor stats` never filled. The
    version comes with the connection (no round trip), so readiness probes may ask.
    """
    version = conn.get_server_version()
    if version.major < MIN_POSTGRES_MAJOR:
        raise ConfigError(
            f"PostgreSQL {version.major}.{version.minor} is too old: Conveyor needs "
            f"PostgreSQL {MIN_POSTGRES_MAJOR} or newer"
        )


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


def _duration(seconds: float) -> str:
    """`0.3 s`, `45 s`, `4 min 10 s`, `2 h 5 min`."""
    minutes, whole_seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {whole_seconds} s"
    return f"{round(seconds, 1):g} s"
