"""The server's connection pool: clean connections back without a reset round trip, and a
database that refuses to serve seen as unavailable (UNAVAILABLE to callers, who retry)."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import asyncpg
import grpc
import pytest
from helpers import AppRole, Db, rpc_count, wait_for

from conveyor import Client, RetryPolicy, Task
from conveyor.breaker import BreakerPolicy, BreakerState
from conveyor.errors import ServerUnavailable
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server.config import ServerConfig
from conveyor.server.database import Database, is_unavailable

TOO_MANY_CONNECTIONS = ("CONNECTION LIMIT 0", "CONNECTION LIMIT -1")


def test_a_transaction_left_open_is_rolled_back_before_reuse(database_url) -> None:
    """A call cancelled mid-transaction must not leave the next user of its connection
    inside that transaction, or holding its row locks."""

    async def scenario() -> tuple[bool, int]:
        database = Database(
            ServerConfig(database_url=database_url, pool_max_size=1, grpc_listen="127.0.0.1:0")
        )
        await database.connect(startup_timeout=timedelta(seconds=30))
        try:
            async with database.connection() as conn:
                await conn.execute("BEGIN")
                await conn.execute("CREATE TABLE left_open (x int)")
            async with database.connection() as conn:
                in_transaction = conn.is_in_transaction()
                exists = await conn.fetchval(
                    "SELECT count(*) FROM pg_tables WHERE tablename = 'left_open'"
                )
            return in_transaction, exists
        finally:
            await database.close()

    in_transaction, exists = asyncio.run(scenario())
    assert in_transaction is False
    assert exists == 0


class TestDatabaseRefusingConnections:
    def test_calls_answer_unavailable_and_a_client_rides_the_refusal_out(
        self, app_role: AppRole, start_server
    ) -> None:
        """With PostgreSQL refusing new connections (53300, too many connections: the storm
        after a restart), a call answers UNAVAILABLE, not INTERNAL, so clients retry: an
        enqueue sent during the refusal succeeds once connections are accepted again."""
        server = start_server(database_url=app_role.url, db_breaker_reset=timedelta(seconds=0.2))
        quick = BreakerPolicy(failure_threshold=5, reset_timeout=timedelta(seconds=0.2))
        patient = RetryPolicy(
            total_timeout=timedelta(seconds=20), backoff_cap=timedelta(seconds=0.2)
        )
        task_id = str(uuid.uuid4())
        with (
            grpc.insecure_channel(server.address) as channel,
            Client(server.address, retry=patient, breaker=quick) as client,
            ThreadPoolExecutor(max_workers=1) as pool,
        ):
            with app_role.refused(*TOO_MANY_CONNECTIONS):
                with pytest.raises(grpc.RpcError) as caught:
                    pb_grpc.TaskServiceStub(channel).GetTask(
                        pb.GetTaskRequest(task_id=str(uuid.uuid4())), timeout=10
                    )
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, caught.value.details()

                enqueued = pool.submit(client.enqueue_task, Task(type="refused.job", id=task_id))
                wait_for(
                    lambda: rpc_count(server.http_url, "EnqueueTasks", "UNAVAILABLE") >= 1,
                    timeout=10,
                    what="the enqueue to be refused as UNAVAILABLE at least once",
                )
                assert not enqueued.done()
            assert enqueued.result(timeout=20) == task_id
        assert Db(app_role.admin_url).task(task_id)["state"] == "queued"

    def test_a_connection_to_a_read_only_server_is_replaced(self, app_role: AppRole) -> None:
        """A write refused as read-only (25006: the session is on a standby, as after a
        failover) is UNAVAILABLE, and the connection that got it is dropped, so the retry
        runs on a new connection, which reaches the primary, instead of reusing the
        read-only session."""

        async def scenario() -> int:
            database = Database(ServerConfig(database_url=app_role.url, pool_max_size=1))
            await database.connect(startup_timeout=timedelta(seconds=10))
            try:
                # The pool's one session turns read-only, as on a demoted primary; a new
                # session would be writable (the failover is over for new sessions).
                async with database.connection() as conn:
                    await conn.execute("SET default_transaction_read_only = on")
                with pytest.raises(ServerUnavailable, match="ReadOnlySQLTransactionError"):
                    async with database.connection() as conn:
                        await conn.execute("CREATE TABLE written (x int)")
                async with database.connection() as conn:
                    await conn.execute("CREATE TABLE written (x int)")
                    return int(await conn.fetchval("SELECT count(*) FROM written"))
            finally:
                await database.close()

        assert asyncio.run(scenario()) == 0


class TestTheDatabaseBreakerSettlesEveryProbe:
    def test_a_probe_refused_for_its_login_lets_the_server_back_in_once_fixed(
        self, app_role: AppRole, start_server
    ) -> None:
        """The database breaker opens while PostgreSQL refuses connections; its probe then
        meets a refused login (28000, not an "unavailable" error). The probe must settle the
        breaker: it used to leave it half-open with a probe in flight for good, and the
        server answered "circuit open" for ever, long after the login was allowed again."""
        server = start_server(
            database_url=app_role.url,
            db_breaker_failures=2,
            db_breaker_reset=timedelta(seconds=0.2),
        )
        breaker = server.server.database.breaker
        missing = str(uuid.uuid4())

        def get_task() -> grpc.StatusCode:
            try:
                pb_grpc.TaskServiceStub(channel).GetTask(
                    pb.GetTaskRequest(task_id=missing), timeout=10
                )
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        with grpc.insecure_channel(server.address) as channel:
            with app_role.refused(*TOO_MANY_CONNECTIONS):
                wait_for(
                    lambda: (
                        get_task() is grpc.StatusCode.UNAVAILABLE
                        and breaker.state is not BreakerState.CLOSED
                    ),
                    what="the database breaker to open",
                )
                with app_role.refused("NOLOGIN", "LOGIN"):
                    # Probes now meet the refused login.
                    wait_for(
                        lambda: get_task() is grpc.StatusCode.INTERNAL,
                        what="a probe to meet the refused login",
                    )
            # Connections and logins are allowed again: calls reach the database.
            wait_for(
                lambda: get_task() is grpc.StatusCode.NOT_FOUND,
                what="the server to reach the database again",
            )
        assert breaker.state is BreakerState.CLOSED


class TestShortOfResources:
    """Class 53: which shortages a retry can outlast (UNAVAILABLE) and which it cannot."""

    def test_a_configured_limit_is_an_error_not_unavailable(self, database_url) -> None:
        """A statement over a configured limit (53400 configuration_limit_exceeded, here
        temp_file_limit, provoked for real) fails the same way each time it runs, until an
        operator raises the setting: it must reach the caller as the error it is, not as
        UNAVAILABLE that clients retry until their budget runs out, and the database,
        which answered, must not count as down (one failure opens this breaker)."""

        async def scenario() -> BreakerState:
            database = Database(
                ServerConfig(database_url=database_url, pool_max_size=1, db_breaker_failures=1)
            )
            await database.connect(startup_timeout=timedelta(seconds=30))

            async def sort_past_the_limit() -> None:
                async with database.transaction() as conn:
                    await conn.execute("SET LOCAL work_mem = '64kB'")
                    await conn.execute("SET LOCAL temp_file_limit = '64kB'")
                    # A sort of a few MB spills to disk, past 64 kB of temporary files.
                    await conn.fetchval(
                        "SELECT count(*) FROM (SELECT g FROM generate_series(1, 200000) AS g"
                        " ORDER BY g DESC OFFSET 0) AS sorted"
                    )

            try:
                with pytest.raises(
                    asyncpg.ConfigurationLimitExceededError, match="temp_file_limit"
                ):
                    await sort_past_the_limit()
                return database.breaker.state
            finally:
                await database.close()

        assert asyncio.run(scenario()) is BreakerState.CLOSED

    @pytest.mark.parametrize(
        ("error", "unavailable"),
        [
            # Shortages that free up with load, a checkpoint or an operator, whatever the
            # statement: shared memory segments or worker slots, disk, memory (of the
            # server, or the lock table all sessions share), connection slots.
            (asyncpg.InsufficientResourcesError, True),
            (asyncpg.DiskFullError, True),
            (asyncpg.OutOfMemoryError, True),
            (asyncpg.TooManyConnectionsError, True),
            # A configured cap on what one statement may use: the same statement meets it
            # again.
            (asyncpg.ConfigurationLimitExceededError, False),
        ],
    )
    def test_which_shortages_are_unavailable(
        self, error: type[asyncpg.PostgresError], unavailable: bool
    ) -> None:
        """The classifier on asyncpg's own exception classes for each SQLSTATE of class 53
        (only 53400 and 53300 can be provoked here without starving the test machine)."""
        assert is_unavailable(error("short")) is unavailable


class _SessionsDroppedOnceAfterConnecting(Database):
    """A server's database that ends the server's sessions once, after its pools opened and
    before its start-up checks ran: as a restart, a failover or an operator's
    pg_terminate_backend does in the second after a server first reached it. The pools
    still hold the connections; the checks find them dead."""

    dropped = 0

    async def _require_own_sessions(self) -> None:
        if not self.dropped:
            self.dropped = await _terminate_sessions_of(
                self._config.database_url, f"conveyor-server {self._config.server_id}"
            )
        await super()._require_own_sessions()


async def _terminate_sessions_of(database_url: str, application_name: str) -> int:
    operator = await asyncpg.connect(database_url)
    try:
        ended: int = await operator.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1",
            application_name,
        )
        return ended
    finally:
        await operator.close()


def test_a_session_lost_during_the_start_up_checks_is_retried(database_url) -> None:
    """Only the first connection used to be retried: a session lost in the checks after it
    (sessions of its own, the migration, the schema) ended the start with "cannot reach
    PostgreSQL", with the database back at once and most of the start-up timeout left."""

    async def scenario() -> int:
        database = _SessionsDroppedOnceAfterConnecting(ServerConfig(database_url=database_url))
        try:
            await database.connect(startup_timeout=timedelta(seconds=30))
            async with database.connection() as conn:
                served: int = await conn.fetchval("SELECT count(*) FROM conveyor_tasks")
            assert database.dropped >= 2  # one in each pool
            return served
        finally:
            await database.close()

    assert asyncio.run(scenario()) == 0
