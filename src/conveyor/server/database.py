"""The server's connection to PostgreSQL.

Bounded pools, timeouts, a circuit breaker, and error translation.

Every statement runs with a statement timeout, every pool acquire with a deadline, and
every driver exception that means "the database cannot serve us right now" (unreachable,
out of connections, shutting down, read-only: `is_unavailable`) becomes
`ServerUnavailable`, which gRPC callers see as UNAVAILABLE and retry. Two pools: the main
one for requests, and a small reserved one (`priority_connection`) for leader elections and
worker heartbeats, so a burst of producers cannot starve the calls that keep leases alive.

A circuit breaker sits in front of both: after consecutive connection failures it opens,
and calls fail at once with UNAVAILABLE instead of each waiting out a connect timeout; one
probe at a time then tests whether PostgreSQL is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from conveyor.breaker import BreakerPolicy, CircuitBreaker, Permit
from conveyor.errors import ConfigError, ConveyorError, ServerUnavailable
from conveyor.storage import migrate

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from datetime import timedelta

    from conveyor.server.config import ServerConfig

Batch = TypeVar("Batch")
Result = TypeVar("Result")

log = logging.getLogger("conveyor.server.database")

# Exceptions that mean "the database cannot serve us right now", as opposed to a bad query
# or a bad configuration (less PERSISTENT_ERRORS: ask `is_unavailable`): callers see
# UNAVAILABLE and retry, and the breaker counts a failure. By SQLSTATE class, and why each
# is transient:
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    # Refused, reset or timed-out connections (asyncpg raises OSError subclasses and
    # TimeoutError for these), and 08xxx, the connection failed or was dropped.
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # 53xxx: PostgreSQL is short of something all sessions share, which frees up with
    # load, a checkpoint or an operator, whatever the statement: above all 53300, too many
    # connections (max_connections or the role's CONNECTION LIMIT), which every server
    # reconnecting at once after a restart or a switchover meets for a few seconds; 53100
    # disk full; 53200 out of memory (the server's, or the lock table's "out of shared
    # memory", shared by every session; no Conveyor statement needs much of either alone,
    # its batches and payloads being bounded); 53000 and codes PostgreSQL may add to the
    # class (shared memory segments, background worker slots). Except 53400: see
    # PERSISTENT_ERRORS.
    asyncpg.InsufficientResourcesError,
    # 57P01 terminated by an administrator or a fast shutdown, 57P02 a crashed backend made
    # the server restart, 57P03 starting up or in recovery, 57P05 an idle session ended:
    # the session is gone and a new connection succeeds once the server is up.
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.IdleSessionTimeoutError,
    # 25P03: our idle_in_transaction_session_timeout ended a session whose call stalled;
    # the transaction was rolled back and the call can run again on a new one.
    asyncpg.IdleInTransactionSessionTimeoutError,
    # 57014: statement_timeout; the database is too slow to answer right now.
    asyncpg.QueryCanceledError,
    # 25006: a write reached a server that is read-only, a standby after a failover or a
    # demoted primary. Transient once the URL leads to the new primary; the connection
    # that got it is dropped (see `_acquire`), or the pool would keep reusing it.
    asyncpg.ReadOnlySQLTransactionError,
    # A connection whose backend was terminated mid-operation can report its broken state
    # this way ("cannot switch to state ..."), on the next statement or on release.
    asyncpg.InternalClientError,
)

# Not in the list, on purpose: 28000/28P01 (the role may not log in, a wrong password) and
# 3D000 (no such database) are configuration errors that no retry fixes until an operator
# acts. As UNAVAILABLE, clients and workers would retry them quietly, and the breaker would
# report the database as down; they stay errors, answered INTERNAL and logged with their
# traceback on every call. The elector and the maintenance loops log them and carry on
# (leadership.py, service.py), so the cluster recovers by itself once they are fixed. Nor
# 57P04 (the database was dropped), 54xxx (a statement over a program limit: the same one
# fails the same way), or the classes of a bad query or bad data (22, 23, 42).

# Errors of a class in UNAVAILABLE_ERRORS that are not "right now": 53400
# (configuration_limit_exceeded) is a configured cap on what one statement may use, such
# as temp_file_limit on its temporary files. The same statement meets it again on every
# retry until an operator raises the setting, so it stays an error (INTERNAL, logged), and
# the database, which answered, is not counted as down.
# And asyncpg's ClientConfigurationError, an InterfaceError that it raises, before it opens
# any socket, for a URL or a connection option it cannot use (sslmode=bogus): the same URL
# fails the same way every time.
PERSISTENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.ConfigurationLimitExceededError,
    asyncpg.ClientConfigurationError,
)


def is_unavailable(error: BaseException) -> bool:
    """Whether `error` means the database cannot serve us right now: retry later."""
    return isinstance(error, UNAVAILABLE_ERRORS) and not isinstance(error, PERSISTENT_ERRORS)


def connect_failure(error: Exception) -> ConveyorError | None:
    """What a failed attempt to connect means, for the operator.

    ServerUnavailable when a later attempt may succeed (refused, timed out, starting up,
    too many connections): worth retrying. ConfigError when none will until someone changes
    the URL or the database: a malformed URL or connection option (asyncpg raises a
    ValueError for those), or PostgreSQL answering no (the role may not log in, no such
    database, an unknown setting in the URL). None for anything else.
    """
    if isinstance(error, ValueError):
        return ConfigError(f"invalid database URL: {error}")
    if is_unavailable(error):
        return ServerUnavailable(f"cannot reach PostgreSQL: {error}")
    if isinstance(error, asyncpg.PostgresError):
        return ConfigError(f"PostgreSQL refused the connection: {error}")
    return None


# The database is fine but this transaction lost a race (two statements locking the same
# rows in different orders, or a serialization conflict): retrying the call succeeds, so
# it is UNAVAILABLE (transient) for the caller, and no reason to open the breaker.
CONFLICT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


async def _end_open_transaction(conn: Any) -> None:
    """What a connection needs before it goes back to the pool: no open transaction.

    asyncpg's default reset (unlock advisory locks, close cursors, UNLISTEN, RESET ALL) is
    one more round trip per call, measured at several percent of the server's time; Conveyor
    never leaves that session state on a pooled connection (its advisory lock is
    transaction-scoped, LISTEN has a connection of its own, no SET outside a transaction),
    so only a transaction left open by a cancelled call needs ending.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class Database:
    """A pool of connections, created by `connect` and closed by `close`."""

    def __init__(self, config: ServerConfig) -> None:
        """Keep the config; `connect` opens the pool."""
        self._config = config
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._priority_pool: asyncpg.Pool[asyncpg.Record] | None = None
        # PostgreSQL backend pids of the pooled connections: a NOTIFY from one of them was
        # sent by this server, which has already woken its own long polls.
        self.backend_pids: set[int] = set()
        self.breaker = CircuitBreaker(
            BreakerPolicy(
                failure_threshold=config.db_breaker_failures,
                reset_timeout=config.db_breaker_reset,
            )
        )

    @property
    def url(self) -> str:
        """The database URL (for the LISTEN connection)."""
        return self._config.database_url

    def server_settings(self) -> dict[str, str]:
        """Session settings for every connection Conveyor opens."""
        timeout_ms = int(self._config.statement_timeout.total_seconds() * 1000)
        return {
            "application_name": f"conveyor-server {self._config.server_id}"[:63],
            "statement_timeout": str(timeout_ms),
            # A crashed server must not hold row locks: idle transactions are ended.
            "idle_in_transaction_session_timeout": str(max(timeout_ms, 1000) * 3),
            # The statement timeout bounds every wait for a row lock. A role's own
            # lock_timeout (ALTER ROLE ... SET lock_timeout) made such a wait fail with
            # 55P03, which no caller retries: a cancel answered INTERNAL, and a report or
            # heartbeat waiting behind an operator's action could be lost.
            "lock_timeout": "0",
        }

    async def connect(self, *, startup_timeout: timedelta) -> None:
        """Open the pool, retrying while the database starts; check (or apply) the schema."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + startup_timeout.total_seconds()
        delay = 0.1
        while True:
            try:
                self._pool = await self._create_pool(self._config.pool_max_size)
                self._priority_pool = await self._create_pool(self._config.priority_pool_size)
                break
            except Exception as exc:
                # Only what a later attempt may fix is retried: a malformed URL or a refused
                # login fails at once, rather than after the whole start-up timeout.
                failure = connect_failure(exc)
                if failure is None:
                    raise
                if not isinstance(failure, ServerUnavailable) or loop.time() + delay > give_up_at:
                    raise failure from exc
                log.warning(
                    "database not reachable, retrying",
                    extra={"event": "database_retry", "error": str(exc)},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        async with self.connection() as conn:
            if self._config.migrate:
                # The pooled connection only watches: it names the sessions a migration
                # waits for, should it give up.
                applied = await self._migrate(observer=conn)
                for migration in applied:
                    log.info(
                        "applied migration %s",
                        migration.label,
                        extra={"event": "migration_applied"},
                    )
            version = await migrate.check_schema(conn)
        if version > migrate.latest_version():
            log.info(
                "the database schema is version %d, newer than this server's %d; its newer "
                "migrations all say this release runs correctly on it",
                version,
                migrate.latest_version(),
                extra={"event": "schema_newer_compatible"},
            )

    async def _migrate(self, *, observer: Any) -> list[migrate.Migration]:
        """Apply pending migrations on a connection of their own, as `conveyor migrate` does.

        Not a pooled one: its statement timeout would end a migration that rightly takes
        longer (re-checking a constraint over a large table) and fail the start. A lock wait
        is bounded by the migration's own lock timeout instead.
        """
        settings = {**self.server_settings(), "statement_timeout": "0"}
        try:
            conn = await asyncpg.connect(
                self._config.database_url,
                server_settings=settings,
                timeout=self._config.pool_acquire_timeout.total_seconds(),
            )
        except Exception as exc:
            failure = connect_failure(exc)
            if failure is None:
                raise
            raise failure from exc
        try:
            return await migrate.migrate(
                conn,
                lock_timeout=self._config.migrate_lock_timeout,
                attempts=self._config.migrate_lock_attempts,
                observer=observer,
            )
        finally:
            await conn.close()

    async def _create_pool(self, size: int) -> asyncpg.Pool[asyncpg.Record]:
        return await asyncpg.create_pool(
            self._config.database_url,
            min_size=1,
            max_size=size,
            server_settings=self.server_settings(),
            timeout=self._config.pool_acquire_timeout.total_seconds(),
            reset=_end_open_transaction,
            init=self._track_backend,
        )

    async def _track_backend(self, conn: Any) -> None:
        """Remember the PostgreSQL backend of each pooled connection while it is open."""
        pid = conn.get_server_pid()
        self.backend_pids.add(pid)
        conn.add_termination_listener(lambda _conn: self.backend_pids.discard(pid))

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection; unavailability surfaces as ServerUnavailable."""
        async with self._acquire(self._pool) as conn:
            yield conn

    def bind(
        self, statement: Callable[[Any, Batch], Awaitable[Result]]
    ) -> Callable[[Batch], Awaitable[Result]]:
        """`statement(conn, batch)` as `write(batch)` on a pooled connection (for a GroupCommit)."""

        async def run(batch: Batch) -> Result:
            async with self.connection() as conn:
                return await statement(conn, batch)

        return run

    @contextlib.asynccontextmanager
    async def priority_connection(self) -> AsyncIterator[Any]:
        """A connection from the reserved pool (elections, heartbeats)."""
        async with self._acquire(self._priority_pool) as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _acquire(self, pool: asyncpg.Pool[asyncpg.Record] | None) -> AsyncIterator[Any]:
        if pool is None:
            raise ServerUnavailable("the server is not connected to PostgreSQL")
        permit = self.breaker.allow()
        if permit is None:
            raise ServerUnavailable(
                "database unavailable (circuit open after repeated failures; next probe in "
                f"{self.breaker.retry_in():.1f}s)"
            )
        conn = await self._checkout(pool, permit)
        try:
            yield conn
        except BaseException as exc:
            self._settle_breaker(permit, exc)
            if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
                # This session is on a server that takes no writes, and stays there (a
                # demoted primary need not restart, and a setting like
                # default_transaction_read_only holds for the session): only a new
                # connection can reach the primary the URL now leads to.
                conn.terminate()
            if is_unavailable(exc):
                raise _unavailable(exc) from exc
            if isinstance(exc, CONFLICT_ERRORS):
                raise ServerUnavailable(f"transaction conflict, retry: {exc}") from exc
            raise
        else:
            self.breaker.record_success(permit)
        finally:
            await self._release(pool, conn)

    def _settle_breaker(self, permit: Permit, error: BaseException) -> None:
        """Give the breaker the verdict of a call to the database that raised `error`.

        Every outcome settles it, or a probe left in flight would refuse every call from
        then on and the server would never reach the database again: an unavailable error
        is a failure; a call cancelled before PostgreSQL answered taught nothing (a probe
        is released, the next call probes); anything else is an answer (a business error, a
        lost race, a login refused: the database is reachable).
        """
        if is_unavailable(error):
            self.breaker.record_failure(permit)
        elif isinstance(error, asyncio.CancelledError):
            self.breaker.record_abandoned(permit)
        else:
            self.breaker.record_success(permit)

    @staticmethod
    async def _release(pool: asyncpg.Pool[asyncpg.Record], conn: Any) -> None:
        """Return a connection to the pool. Never fails the call it served.

        When resetting a broken connection fails, asyncpg terminates it and frees its pool
        slot itself before re-raising; the next acquire opens a fresh connection.
        """
        try:
            await pool.release(conn)
        except Exception as exc:
            log.warning(
                "dropped a broken database connection: %s: %s",
                type(exc).__name__,
                exc,
                extra={"event": "connection_dropped"},
            )

    async def _checkout(self, pool: asyncpg.Pool[asyncpg.Record], permit: Permit) -> Any:
        """A connection from `pool`; a full pool is "busy", not "database down"."""
        timeout = self._config.pool_acquire_timeout.total_seconds()
        try:
            return await pool.acquire(timeout=timeout)
        except TimeoutError as exc:
            if pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size():
                # Every connection is in use: local contention. Counting it against the
                # database would let a burst of producers open the breaker and cut off
                # the heartbeats and elections the reserved pool exists to protect.
                self.breaker.record_success(permit)
                raise ServerUnavailable(
                    f"server busy: no database connection free within {timeout:g}s"
                ) from exc
            self.breaker.record_failure(permit)
            raise ServerUnavailable(
                f"database unavailable: connect timed out ({timeout:g}s)"
            ) from exc
        except BaseException as exc:
            self._settle_breaker(permit, exc)
            if is_unavailable(exc):
                raise _unavailable(exc) from exc
            raise

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """A pooled connection inside a transaction."""
        async with self.connection() as conn, conn.transaction():
            yield conn

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Any]:
        """A pooled connection in a read-only repeatable-read transaction.

        For several reads that must agree: each sees the same snapshot, and no write
        committed between them.
        """
        async with (
            self.connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield conn

    def pool_in_use(self) -> int:
        """Connections currently checked out of the pool."""
        if self._pool is None:
            return 0
        return self._pool.get_size() - self._pool.get_idle_size()

    async def close(self) -> None:
        """Close the pools, waiting briefly for connections in use."""
        pools = [pool for pool in (self._pool, self._priority_pool) if pool is not None]
        self._pool = self._priority_pool = None
        for pool in pools:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except TimeoutError:
                pool.terminate()


def _unavailable(error: BaseException) -> ServerUnavailable:
    """What callers see of a database error that `is_unavailable`: retry later."""
    return ServerUnavailable(f"database unavailable: {type(error).__name__}: {error}")
