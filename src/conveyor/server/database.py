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
import os
import socket
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg

from conveyor.breaker import BreakerPolicy, CircuitBreaker, Permit
from conveyor.errors import ConfigError, ConveyorError, ServerUnavailable
from conveyor.storage import migrate, queries

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

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


# Why a writable session cannot be had: the URL leads to a standby, or to a primary that
# was demoted, or sessions start read-only.
_READ_ONLY = "PostgreSQL is read-only (a standby, or default_transaction_read_only is on)"


def connect_failure(error: Exception, url: str | None = None) -> ConveyorError | None:
    """What a failed attempt to connect to `url` means, for the operator.

    ServerUnavailable when a later attempt may succeed (refused, timed out, starting up,
    too many connections, only a standby, a host name that does not resolve yet): worth
    retrying. ConfigError when none will until someone changes the URL or the database
    (see `_refused_for_good`). None for anything else.
    """
    refused = _refused_for_good(error)
    if refused is not None:
        return refused
    if isinstance(error, socket.gaierror) and url is not None:
        # The resolver's words ("Name or service not known") name no host; a refused
        # connection's do (asyncpg's "Connect call failed ('10.0.0.5', 5432)").
        hosts = _url_hosts(url)
        which = "hosts" if "," in hosts else "host"
        return ServerUnavailable(
            f"cannot reach PostgreSQL: the database URL's {which} {hosts} did not resolve ({error})"
        )
    if isinstance(error, asyncpg.TargetServerAttributeNotMatched):
        # Transient: a failover in progress promotes one of them.
        return ServerUnavailable(f"{_READ_ONLY}: {error}")
    if is_unavailable(error):
        return ServerUnavailable(f"cannot reach PostgreSQL: {error}")
    if isinstance(error, asyncpg.PostgresError):
        return ConfigError(f"PostgreSQL refused the connection: {error}")
    return None


def _url_hosts(url: str) -> str:
    """The host names a database URL lists, for a message (`db1, db2`)."""
    parts = urlsplit(url)
    named = [
        entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry
        for entry in parts.netloc.rpartition("@")[2].split(",")
        if entry
    ]
    for listed in parse_qs(parts.query).get("host", []):
        named.extend(host for host in listed.split(",") if host)
    return ", ".join(named) or "(none: a local socket)"


def _refused_for_good(error: Exception) -> ConfigError | None:
    """A connection failure no retry fixes (None: not one of these).

    A malformed URL or connection option (asyncpg raises a ValueError for those), SSL asked
    for and not offered, or a setting in the URL that a pooler does not pass on: the last
    two are errors `is_unavailable` would call transient.
    """
    if isinstance(error, ValueError):
        return ConfigError(f"invalid database URL: {error}")
    if isinstance(error, ConnectionError) and "rejected SSL upgrade" in str(error):
        # sslmode=require (or verify-*) in the URL, and a server with SSL off: every
        # attempt is refused the same way until one of the two changes.
        return ConfigError(
            f"{error}: the database URL asks for SSL (sslmode) and the server does not "
            "offer it; enable ssl on the server, or change sslmode in the URL"
        )
    if isinstance(error, asyncpg.ProtocolViolationError) and "startup parameter" in str(error):
        # A pooling proxy (PgBouncer) refusing a setting the URL's query string asks for:
        # asyncpg sends every query parameter it does not know as a session setting. The
        # proxy's other refusals share this SQLSTATE (08P01) and are transient (it cannot
        # reach PostgreSQL, no more connections allowed), so only this one is matched.
        return ConfigError(
            f"the database refused the connection: {error}; a connection pooler passes on "
            "only a few session settings: remove it from the database URL's query string, "
            "or set it on the role (ALTER ROLE ... SET)"
        )
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


# How long the session check lets its read wait before it ends the other connection's
# transaction (see require_own_sessions): a read of a setting takes well under a
# millisecond on a session of its own; one that waits this long may be waiting for the
# backend that transaction holds, which is then shared. Only what the read then returns
# decides, not the wait: a slow database is not taken for a pooler.
_SESSION_CHECK_WAIT = timedelta(seconds=2)

_SHARED_SESSIONS = (
    "the database URL leads to a connection pooler that shares PostgreSQL sessions "
    "between clients ({detail}); Conveyor needs a session per connection: point it at "
    "PostgreSQL itself, or at a pool in session mode (PgBouncer: pool_mode = session)"
)


def writable_target(url: str) -> dict[str, Any]:
    """asyncpg.connect's keywords for a connection to `url` that must write.

    `target_session_attrs=read-write`, unless the URL or PGTARGETSESSIONATTRS chooses
    (nothing then: asyncpg reads them). Servers and migrations need a primary, and a URL
    listing several hosts (a primary and its standbys) then connects to whichever is the
    primary now, after a failover too; a standby alone is "unavailable" until it is
    promoted, instead of each write failing on it.
    """
    if "target_session_attrs" in parse_qs(urlsplit(url).query):
        return {}
    return {} if os.environ.get("PGTARGETSESSIONATTRS") else {"target_session_attrs": "read-write"}


async def require_own_sessions(probe: Any, other: Any) -> None:
    """ConfigError if `probe` and `other` do not each have a PostgreSQL session of their own.

    Conveyor needs each connection to be a session of its own: the server's timeouts are
    session settings, the notifier's LISTEN must stay on its backend, and asyncpg's
    prepared statements live in the session. Behind PgBouncer in transaction or statement
    pooling mode none of that holds, and nothing fails at once: the timeouts are silently
    missing, notifications go astray (or to another client), and calls fail later, under
    load, with "prepared statement ... does not exist" (`conveyor migrate` the second time
    it ran). So this looks first, in a few round trips: a marker set in `probe`'s session;
    `other` then takes a backend inside a transaction (a pooler hands it the one `probe`
    just left, its most recently used); and `probe` reads its marker back, with its
    backend's pid. Its own session still has the marker, on a backend other than
    `other`'s. A shared one has lost it, or (a pooler with one backend for all) makes the
    read wait until `other`'s transaction ends and then runs on that same backend.
    """
    marker = uuid.uuid4().hex
    reading: asyncio.Future[tuple[str | None, int]] | None = None
    try:
        await queries.session_mark(probe, marker=marker)
        async with other.transaction():
            others_pid = await queries.session_backend_pid(other)
            reading = asyncio.ensure_future(queries.session_marked(probe))
            await asyncio.wait({reading}, timeout=_SESSION_CHECK_WAIT.total_seconds())
        seen, probes_pid = await reading
    except (asyncpg.InvalidSQLStatementNameError, asyncpg.DuplicatePreparedStatementError) as exc:
        # A statement prepared on one backend and run on another (26000), or prepared
        # again on a backend another client had prepared it on (42P05): transaction
        # pooling, met before the marker could tell.
        raise ConfigError(_SHARED_SESSIONS.format(detail=str(exc).splitlines()[0])) from exc
    except asyncpg.PostgresConnectionError as exc:
        if "pooling mode" not in str(exc):
            raise
        # PgBouncer's statement pooling refuses the transaction and closes the connection,
        # saying "transaction blocks not allowed in statement pooling mode" (08P01, which
        # asyncpg reports as the connection lost).
        raise ConfigError(_SHARED_SESSIONS.format(detail=str(exc))) from exc
    finally:
        if reading is not None and not reading.done():
            # Never leave a query running on a connection that goes back to its pool.
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
    if seen != marker:
        raise ConfigError(
            _SHARED_SESSIONS.format(
                detail="a setting made in one session was gone from it on the next statement"
            )
        )
    if probes_pid == others_pid:
        raise ConfigError(
            _SHARED_SESSIONS.format(
                detail=f"two connections ran on the same PostgreSQL backend, pid {others_pid}"
            )
        )


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
        # Why the database was last unavailable, for the messages of an open breaker.
        self._last_failure = "none yet"
        # When (time.monotonic) the database was last found unreachable or refused by the
        # open breaker, or the server connected: see `reachable_for`.
        self._unreachable_at: float | None = None
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

    def connect_options(self) -> dict[str, Any]:
        """Options for every connection the server opens (`asyncpg.connect`'s keywords).

        Startup parameters: only the session's name. Its timeouts are set once it is open
        (`configure_session`): a pooling proxy refuses startup parameters it does not pass
        on itself (stock PgBouncer answers "unsupported startup parameter:
        statement_timeout" to all but a few), and application_name is one every proxy
        passes on.

        And a writable server (`writable_target`).
        """
        return {
            "server_settings": {
                "application_name": f"conveyor-server {self._config.server_id}"[:63]
            },
            **writable_target(self.url),
        }

    async def configure_session(
        self, conn: Any, *, statement_timeout: timedelta | None = None
    ) -> int:
        """Apply the server's session settings to a new connection; its backend's pid.

        Every statement runs under the statement timeout (`statement_timeout`, zero for
        none, overrides the configured one); a crashed or stalled server must not hold row
        locks, so an idle transaction ends after three of them (at least 3 s); and the
        statement timeout alone bounds every wait for a row lock: a role's own lock_timeout
        (ALTER ROLE ... SET lock_timeout) made such a wait fail with 55P03, which no caller
        retries, so a cancel answered INTERNAL and a report or heartbeat waiting behind an
        operator's action could be lost.
        """
        configured = self._config.statement_timeout
        return await queries.session_configure(
            conn,
            statement_timeout=configured if statement_timeout is None else statement_timeout,
            idle_in_transaction_timeout=max(configured, timedelta(seconds=1)) * 3,
        )

    async def connect(self, *, startup_timeout: timedelta) -> None:
        """Open the pool and check (or apply) the schema, retrying while the database starts.

        Every step is retried while the failure is one a later attempt may fix, not only
        the first connection: a database that answered once and then restarted, failed
        over or dropped the session (an operator's pg_terminate_backend, a pooler's
        restart) while the server checked it used to end the start with "cannot reach
        PostgreSQL", though it was back a second later.
        """
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + startup_timeout.total_seconds()
        delay = 0.1
        while True:
            try:
                await self._open_pools()
                version = await self._check_database()
                # The count of `reachable_for` starts here.
                self._unreachable_at = time.monotonic()
                break
            except ServerUnavailable as exc:
                # Only what a later attempt may fix is retried: a malformed URL, a refused
                # login or a schema mismatch fails at once, not after the start-up timeout.
                if loop.time() + delay > give_up_at:
                    raise
                log.warning(
                    "database not reachable, retrying",
                    extra={"event": "database_retry", "error": exc.message},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if version > migrate.latest_version():
            log.info(
                "the database schema is version %d, newer than this server's %d; its newer "
                "migrations all say this release runs correctly on it",
                version,
                migrate.latest_version(),
                extra={"event": "schema_newer_compatible"},
            )

    def reachable_for(self) -> timedelta:
        """How long this server has reached the database without a failure.

        Since it connected (zero before), or since the last call that found the database
        unreachable or was refused by the open breaker. The worker sweeper counts a
        worker's silence only within it.
        """
        if self._unreachable_at is None:
            return timedelta(0)
        return timedelta(seconds=max(0.0, time.monotonic() - self._unreachable_at))

    async def _open_pools(self) -> None:
        """Open the two pools, those not opened by an earlier attempt.

        A failure to connect is what `connect_failure` says it is: ServerUnavailable when a
        later attempt may succeed.
        """
        try:
            if self._pool is None:
                self._pool = await self._create_pool(self._config.pool_max_size)
            if self._priority_pool is None:
                self._priority_pool = await self._create_pool(self._config.priority_pool_size)
        except Exception as exc:
            failure = connect_failure(exc, self._config.database_url)
            if failure is None:
                raise
            raise failure from exc

    async def _check_database(self) -> int:
        """Refuse a pooler that shares sessions; migrate if asked; the schema's version.

        A failure to reach the database in any of these surfaces as ServerUnavailable
        (`_acquire`), which `connect` retries.
        """
        await self._require_own_sessions()
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
            return await migrate.check_schema(conn)

    @staticmethod
    async def require_writable(conn: Any) -> None:
        """Raise ServerUnavailable if `conn`'s session can write nothing.

        A demoted primary, or a standby the URL led to (asyncpg checks only when it
        connects). The connection is dropped, as one refused a write is (`_acquire`), so
        the next one goes where the URL leads now.
        """
        if await queries.session_read_only(conn):
            conn.terminate()
            raise ServerUnavailable(f"{_READ_ONLY}: no task can be enqueued, claimed or finished")

    async def _require_own_sessions(self) -> None:
        """Refuse to serve through a proxy that shares one session between clients."""
        async with self.connection() as probe, self.priority_connection() as other:
            await require_own_sessions(probe, other)

    async def _migrate(self, *, observer: Any) -> list[migrate.Migration]:
        """Apply pending migrations on a connection of their own, as `conveyor migrate` does.

        Not a pooled one: its statement timeout would end a migration that rightly takes
        longer (re-checking a constraint over a large table) and fail the start. A lock wait
        is bounded by the migration's own lock timeout instead.
        """
        try:
            conn = await asyncpg.connect(
                self._config.database_url,
                **self.connect_options(),
                timeout=self._config.pool_acquire_timeout.total_seconds(),
            )
        except Exception as exc:
            failure = connect_failure(exc, self._config.database_url)
            if failure is None:
                raise
            raise failure from exc
        try:
            await self.configure_session(conn, statement_timeout=timedelta(0))
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
            **self.connect_options(),
            timeout=self._config.pool_acquire_timeout.total_seconds(),
            reset=_end_open_transaction,
            init=self._prepare_connection,
        )

    async def _prepare_connection(self, conn: Any) -> None:
        """Configure a new pooled connection, and remember its backend while it is open.

        The pid PostgreSQL reports, not the connection's `get_server_pid()`: behind a
        pooling proxy that is the proxy's stand-in, never a NOTIFY's sender, and the
        notifier would take this server's own notifications for another's.
        """
        pid = await self.configure_session(conn)
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
            self._unreachable_at = time.monotonic()
            raise ServerUnavailable(
                "database unavailable (circuit open after repeated failures, the last: "
                f"{self._last_failure}; next probe in {self.breaker.retry_in():.1f}s)"
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
            self._last_failure = _reason(error)
            self._unreachable_at = time.monotonic()
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
            self._last_failure = f"connect timed out ({timeout:g}s)"
            self._unreachable_at = time.monotonic()
            self.breaker.record_failure(permit)
            raise ServerUnavailable(f"database unavailable: {self._last_failure}") from exc
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
    return ServerUnavailable(f"database unavailable: {_reason(error)}")


def _reason(error: BaseException) -> str:
    """A database error that `is_unavailable`, for an operator."""
    if isinstance(error, asyncpg.TargetServerAttributeNotMatched):
        return f"{_READ_ONLY}: {error}"
    return f"{type(error).__name__}: {error}"
