"""The monitoring endpoints, schema migrations, and the server's schema check at start."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import (
    AppRole,
    claimed_by_a_worker_that_vanishes,
    get_json,
    metric_samples,
    rpc_count,
    run_cli,
    running,
    wait_final,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from conveyor import Client, Task, TaskState, Worker, __version__
from conveyor.errors import PermanentFailure, SchemaMismatch
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server.app import ConveyorServer
from conveyor.server.config import ServerConfig
from conveyor.storage import migrate, queries
from conveyor.types import new_task_id

ALL_VERSIONS = [m.version for m in migrate.available_migrations()]


def http_get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, including error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def sample(body: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text exposition (None when absent)."""
    for family in text_string_to_metric_families(body):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


# --- HTTP ---------------------------------------------------------------------------------


class TestHealthz:
    def test_healthz_is_ok(self, server) -> None:
        """GET /healthz answers 200 while the server runs."""
        status, document = get_json(f"{server.http_url}/healthz")
        assert status == 200
        assert document == {"status": "ok"}


class TestReadyz:
    def test_readyz_reports_ready_with_the_schema_version(self, server) -> None:
        """GET /readyz answers 200, ready true, database ok, the latest schema version."""
        status, document = get_json(f"{server.http_url}/readyz")
        assert status == 200
        assert document["ready"] is True
        assert document["checks"]["schema_version"] == migrate.latest_version()
        assert document["checks"]["database"] == "ok"
        assert document["checks"]["draining"] is False

    def test_readyz_is_503_while_draining(self, server) -> None:
        """Once the server starts draining, /readyz answers 503 with ready false."""

        async def drain() -> None:
            server.server.worker_service.start_draining()

        server.call(drain)
        status, document = get_json(f"{server.http_url}/readyz")
        assert status == 503
        assert document["ready"] is False
        assert document["checks"]["draining"] is True
        # Alive is not the same as ready.
        assert get_json(f"{server.http_url}/healthz")[0] == 200

    def test_readyz_is_503_with_the_reason_when_the_login_is_refused(
        self, app_role: AppRole, start_server
    ) -> None:
        """A refused login (28000) is a configuration error, not "unavailable", but the
        server is no more ready for it: 503 with the reason, as /status says too. Both
        caught only Conveyor's own errors and answered 500."""
        server = start_server(database_url=app_role.url)
        assert get_json(f"{server.http_url}/readyz")[0] == 200
        with app_role.refused("NOLOGIN", "LOGIN"):
            status, document = get_json(f"{server.http_url}/readyz")
            status_code, status_document = get_json(f"{server.http_url}/status")
        assert status == 503
        assert document["ready"] is False
        assert "InvalidAuthorizationSpecificationError" in document["checks"]["database"]
        assert status_code == 200
        assert "InvalidAuthorizationSpecificationError" in status_document["database"]
        wait_for(
            lambda: get_json(f"{server.http_url}/readyz")[0] == 200,
            what="the server to be ready again once the role may log in",
        )


def sampled_status(server, condition) -> dict:
    """The first /status document (sampled after now) for which `condition` holds."""
    asked_at = time.time()

    def fresh():
        _, document = get_json(f"{server.http_url}/status")
        sampled = document.get("sampled_at") or 0
        return document if sampled > asked_at and condition(document) else None

    return wait_for(fresh, timeout=10, what="a /status sample that satisfies the test")


class TestStatus:
    def test_status_counts_the_live_queue_by_type(self, server, client: Client) -> None:
        """GET /status carries the version, the server id and live task counts by type."""
        ids = client.enqueue_tasks([Task(type="status.t") for _ in range(3)])
        client.cancel_task(ids[0])
        document = sampled_status(server, lambda d: d["queue"]["queued"] == 2)
        assert document["version"] == __version__
        assert document["server_id"] == server.config.server_id
        assert document["database"] == "ok"
        assert document["queue"]["by_type"]["status.t"]["queued"] == 2
        assert document["queue"]["by_type"]["status.t"]["running"] == 0
        assert document["oldest_queued_seconds"] >= 0
        assert document["queue"]["by_type"]["status.t"]["oldest_queued_seconds"] >= 0

    def test_status_of_an_empty_queue(self, server) -> None:
        """With no tasks, /status reports an empty queue and no throughput."""
        document = sampled_status(server, lambda _d: True)
        assert document["queue"] == {
            "queued": 0,
            "running": 0,
            "by_type": {},
            "other_types": {"types": 0, "queued": 0, "running": 0, "oldest_queued_seconds": 0},
        }
        assert document["last_minute"]["throughput_per_second"] == 0
        assert document["last_minute"]["failure_rate"] == 0

    def test_status_reports_throughput_and_failure_rate(self, server, client: Client) -> None:
        """Outcomes of the last minute give throughput and the failure rate."""
        worker = Worker(server.address, concurrency=4)
        worker.register_handler("ok", lambda _ctx, _p: b"")

        def fail(_ctx, _payload):
            raise PermanentFailure("no")

        worker.register_handler("bad", fail)
        worker.start()
        try:
            ids = client.enqueue_tasks([Task(type="ok") for _ in range(3)])
            ids += client.enqueue_tasks([Task(type="bad")])
            for task_id in ids:
                wait_final(client, task_id)
        finally:
            worker.stop()
        document = sampled_status(server, lambda d: d["last_minute"]["failed"] == 1)
        minute = document["last_minute"]
        assert minute["succeeded"] == 3
        assert minute["started"] == 4
        assert minute["failure_rate"] == 0.25
        # The last minute is whole 5-second buckets: 55 to 60 seconds, stated.
        assert 55 <= minute["window_seconds"] <= 60
        assert abs(minute["throughput_per_second"] - 4 / minute["window_seconds"]) <= 0.001
        assert document["workers"].get("stopped") == 1
        # `conveyor stats --json` gives the same failure rate (it had none).
        stats = json.loads(run_cli("stats", "--json", "--server", server.address).stdout)
        assert stats["last_minute"]["failure_rate"] == 0.25


class TestSampledMetrics:
    def test_live_queue_gauges_and_oldest_age_are_sampled(self, server, client: Client) -> None:
        """conveyor_tasks{state,type} and the oldest queued age come from the sampler."""
        client.enqueue_tasks([Task(type="gauge.t") for _ in range(2)])
        sampled_status(server, lambda d: d["queue"]["queued"] == 2)
        _, _, body = http_get(f"{server.http_url}/metrics")
        assert sample(body, "conveyor_tasks", state="queued", type="gauge.t") == 2
        assert sample(body, "conveyor_tasks", state="running", type="gauge.t") == 0
        assert sample(body, "conveyor_oldest_queued_task_age_seconds", type="gauge.t") >= 0
        assert sample(body, "conveyor_stats_sampled_timestamp_seconds") > 0

    def test_queue_wait_and_duration_histograms_observe_each_attempt(
        self, server, client: Client
    ) -> None:
        """A run task adds one queue-wait and one duration observation for its type."""
        worker = Worker(server.address, concurrency=1)
        worker.register_handler("hist.t", lambda _ctx, _p: b"")
        worker.start()
        try:
            wait_final(client, client.enqueue_task(Task(type="hist.t")))
        finally:
            worker.stop()
        _, _, body = http_get(f"{server.http_url}/metrics")
        assert sample(body, "conveyor_task_queue_wait_seconds_count", type="hist.t") == 1
        assert (
            sample(body, "conveyor_task_duration_seconds_count", type="hist.t", outcome="succeeded")
            == 1
        )


class TestMetrics:
    def test_metrics_is_prometheus_text(self, server, client: Client) -> None:
        """GET /metrics is Prometheus text with RPC durations and enqueue counts."""
        client.enqueue_tasks([Task(type="metrics.t") for _ in range(3)])
        status, content_type, body = http_get(f"{server.http_url}/metrics")
        assert status == 200
        assert content_type.startswith("text/plain")
        assert "# TYPE conveyor_rpc_duration_seconds histogram" in body
        assert "# TYPE conveyor_tasks_enqueued_total counter" in body
        count = sample(
            body, "conveyor_rpc_duration_seconds_count", method="EnqueueTasks", code="OK"
        )
        assert count == 1
        assert sample(body, "conveyor_tasks_enqueued_total", type="metrics.t") == 3

    def test_a_types_counters_start_at_zero_before_its_first_outcome(self, server) -> None:
        """A series that first appears at 1 has no rise for rate() or increase() to see,
        so the failure-ratio alert missed each type's first failure on each server. The
        counters of a type now exist at 0 from its worker's registration on."""
        counters = (
            "conveyor_task_outcomes_total",
            "conveyor_attempts_cut_short_total",
            "conveyor_tasks_enqueued_total",
        )

        def of_the_type() -> dict[tuple[str, str], float]:
            return {
                (found.name, found.labels.get("outcome") or found.labels.get("reason") or ""): (
                    found.value
                )
                for found in metric_samples(server.http_url)
                if found.name in counters and found.labels.get("type") == "zero.t"
            }

        worker = Worker(server.address, concurrency=1)

        def fail(_ctx: Any, _payload: bytes) -> bytes:
            raise PermanentFailure("no")

        worker.register_handler("zero.t", fail)
        with running(worker):
            before = of_the_type()
            with Client(server.address) as client:
                wait_final(client, client.enqueue_task(Task(type="zero.t")))
            after = of_the_type()
        outcomes = ("succeeded", "failed", "retried", "released", "cancelled")
        assert before == {
            **{("conveyor_task_outcomes_total", outcome): 0.0 for outcome in outcomes},
            ("conveyor_attempts_cut_short_total", "timed_out"): 0.0,
            ("conveyor_attempts_cut_short_total", "lease_expired"): 0.0,
            ("conveyor_tasks_enqueued_total", ""): 0.0,
        }
        assert {key: value for key, value in after.items() if value} == {
            ("conveyor_task_outcomes_total", "failed"): 1.0,
            ("conveyor_tasks_enqueued_total", ""): 1.0,
        }

    def test_streams_and_long_polls_are_timed_apart_from_request_latency(self, server) -> None:
        """A Work stream lasts as long as its worker stays, an enqueue stream as long as its
        producer enqueues, a LeaseTasks long poll as long as it waits for a task: seconds to
        days, not request latency. They are counted, by code, in
        conveyor_long_rpc_duration_seconds, whose buckets reach a day, and not in
        conveyor_rpc_duration_seconds, whose buckets stop at 5 s: there they all landed in
        +Inf, and its quantiles were theirs. An enqueue stream's requests still count there,
        as EnqueueTasks calls."""
        long_calls = "conveyor_long_rpc_duration_seconds"
        with Client(server.address) as client:  # enqueues on an enqueue stream
            task_id = client.enqueue_task(Task(type="metrics.long"))
            worker = Worker(server.address, concurrency=1)  # leases on a Work stream
            worker.register_handler("metrics.long", lambda _ctx, _p: b"")
            with running(worker):
                wait_final(client, task_id)
        channel = grpc.insecure_channel(server.address)
        try:
            workers = pb_grpc.WorkerServiceStub(channel)
            workers.RegisterWorker(
                pb.RegisterWorkerRequest(
                    worker_id="w-long-poll", host="h", pid=1, task_types=["idle"], concurrency=1
                ),
                timeout=10,
            )
            polled = workers.LeaseTasks(
                pb.LeaseTasksRequest(
                    worker_id="w-long-poll",
                    task_types=["idle"],
                    max_tasks=1,
                    wait=Duration(nanos=200_000_000),
                ),
                timeout=10,
            )
            assert not polled.leases
        finally:
            channel.close()
        for method in ("Work", "EnqueueStream", "LeaseTasks"):
            wait_for(
                lambda method=method: rpc_count(server.http_url, method, "OK", long_calls) >= 1,
                what=f"the {method} call to be counted in {long_calls}",
            )
        _, _, body = http_get(f"{server.http_url}/metrics")
        families = {family.name: family for family in text_string_to_metric_families(body)}
        latency = {s.labels["method"] for s in families["conveyor_rpc_duration_seconds"].samples}
        assert latency.isdisjoint({"Work", "EnqueueStream", "LeaseTasks"}), latency
        assert (
            sample(body, "conveyor_rpc_duration_seconds_count", method="EnqueueTasks", code="OK")
            == 1
        )
        buckets = [
            float(s.labels["le"])
            for s in families[long_calls].samples
            if s.name == f"{long_calls}_bucket" and s.labels["le"] != "+Inf"
        ]
        assert max(buckets) >= 24 * 3600, buckets

    def test_idempotent_repeat_is_not_counted(self, server, client: Client) -> None:
        """Enqueueing an existing id again does not raise conveyor_tasks_enqueued_total."""
        task = Task(type="metrics.once", id="00000000-0000-4000-8000-000000000001")
        client.enqueue_task(task)
        client.enqueue_task(task)
        _, _, body = http_get(f"{server.http_url}/metrics")
        assert sample(body, "conveyor_tasks_enqueued_total", type="metrics.once") == 1

    def test_outcomes_count_what_became_of_the_task_whoever_noticed(
        self, server, client: Client, db
    ) -> None:
        """A task that times out on each of its two attempts is retried once and then fails
        for good; a task whose worker vanished on its only attempt fails for good too. The
        outcomes say so, whether the worker reported the timeout or the reaper found the
        lease expired, and the causes are counted apart. The outcome label used to name the
        cause instead, so tasks that died by timeout or lost lease never counted as failed
        (and the documented failure-ratio alert missed them)."""

        async def slow(_ctx: Any, _payload: bytes) -> bytes:
            await asyncio.sleep(30)
            return b"never"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler("outcome.slow", slow)
        with running(worker):
            slow_id = client.enqueue_task(
                Task(type="outcome.slow", timeout=timedelta(milliseconds=300), max_retries=1)
            )
            assert wait_final(client, slow_id).state is TaskState.FAILED
        # A lease whose worker went silent, found by the reaper on the last attempt.
        vanished_id = new_task_id()
        asyncio.run(
            claimed_by_a_worker_that_vanishes(
                db.url, vanished_id, "outcome.vanished", max_retries=0
            )
        )
        db.execute(
            "UPDATE conveyor_tasks SET lease_expires_at = now() - interval '1 second' "
            "WHERE id = $1::uuid",
            vanished_id,
        )
        assert wait_final(client, vanished_id).state is TaskState.FAILED

        _, _, body = http_get(f"{server.http_url}/metrics")
        outcomes = "conveyor_task_outcomes_total"
        cut_short = "conveyor_attempts_cut_short_total"
        assert sample(body, outcomes, type="outcome.slow", outcome="retried") == 1
        assert sample(body, outcomes, type="outcome.slow", outcome="failed") == 1
        assert sample(body, cut_short, type="outcome.slow", reason="timed_out") == 2
        assert sample(body, outcomes, type="outcome.vanished", outcome="failed") == 1
        assert sample(body, cut_short, type="outcome.vanished", reason="lease_expired") == 1
        for cause in ("timed_out", "lease_expired"):
            for task_type in ("outcome.slow", "outcome.vanished"):
                assert sample(body, outcomes, type=task_type, outcome=cause) is None


# --- migrations ---------------------------------------------------------------------------


async def ledger(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return await migrate.applied_versions(conn)
    finally:
        await conn.close()


async def migrate_once(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [m.version for m in await migrate.migrate(conn)]
    finally:
        await conn.close()


async def record_future_migration(url: str) -> None:
    """Record in the ledger a migration of a newer release that only servers knowing it
    may run on (as one without a compatibility header is recorded)."""
    future = ALL_VERSIONS[-1] + 1
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO conveyor_schema_migrations (version, name, oldest_compatible_schema) "
            "VALUES ($1, 'future', $1)",
            future,
        )
    finally:
        await conn.close()


class TestMigrate:
    async def test_concurrent_migrations_apply_once(self, empty_database_url) -> None:
        """Five concurrent migrate() calls: one applies every version, the others nothing."""
        connections = [await asyncpg.connect(empty_database_url) for _ in range(5)]
        try:
            results = await asyncio.gather(*(migrate.migrate(conn) for conn in connections))
        finally:
            for conn in connections:
                await conn.close()
        applied = sorted([m.version for m in result] for result in results)
        assert applied == [[], [], [], [], ALL_VERSIONS]
        assert await ledger(empty_database_url) == ALL_VERSIONS

    async def test_second_run_applies_nothing(self, empty_database_url) -> None:
        """After a successful migration, migrating again applies nothing."""
        assert await migrate_once(empty_database_url) == ALL_VERSIONS
        assert await migrate_once(empty_database_url) == []
        assert await ledger(empty_database_url) == ALL_VERSIONS

    async def test_applying_migrations_refreshes_the_task_tables_statistics(
        self, empty_database_url
    ) -> None:
        """Migration 0011's pinned estimate counts from the next ANALYZE: migrate runs one
        after its transaction commits, and the estimate is then in the statistics."""
        await migrate_once(empty_database_url)
        conn = await asyncpg.connect(empty_database_url)
        try:
            analyzed = await conn.fetchval(
                "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'conveyor_tasks'"
            )
            assert analyzed is not None
            await conn.execute(
                "INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries) "
                "SELECT gen_random_uuid(), 'only', '', interval '60 seconds', 3 "
                "FROM generate_series(1, 500)"
            )
            await conn.execute("ANALYZE conveyor_tasks")
            # One type in the table, yet the planner is told of 100.
            assert (
                await conn.fetchval(
                    "SELECT n_distinct FROM pg_stats "
                    "WHERE tablename = 'conveyor_tasks' AND attname = 'type'"
                )
                == 100
            )
        finally:
            await conn.close()

    async def test_tasks_finished_before_the_marks_existed_are_still_pruned(
        self, empty_database_url
    ) -> None:
        """A database upgraded to 0013 holds tasks no leader has marked: the mark the
        migration seeds must let the pruner reach them at once, not a retention later."""
        await migrate_once(empty_database_url)
        conn = await asyncpg.connect(empty_database_url)
        try:
            # Back to the schema before 0013 (and 0014, which only adds a ledger column),
            # with a week and a day of finished tasks.
            await conn.execute("DROP TABLE conveyor_seq_marks")
            await conn.execute(
                "ALTER TABLE conveyor_schema_migrations DROP COLUMN oldest_compatible_schema"
            )
            await conn.execute("DELETE FROM conveyor_schema_migrations WHERE version >= 13")
            await conn.execute(
                "INSERT INTO conveyor_tasks (id, type, payload, timeout, max_retries, state, "
                "finished_at) SELECT gen_random_uuid(), 'old', '', interval '60 seconds', 0, "
                "'cancelled', now() - interval '8 days' FROM generate_series(1, 50)"
            )
            # 0015 and 0016 run again: what they add is there already, as written for.
            assert [m.version for m in await migrate.migrate(conn)] == [13, 14, 15, 16]
            await conn.execute(
                "INSERT INTO conveyor_leader (name, holder, term, expires_at) "
                "VALUES ('maintenance', 'server-1', 1, now() + interval '1 hour')"
            )
            leader = queries.LeaderProof("server-1", 1)
            batch = await queries.task_prune_finished(
                conn, retention=timedelta(days=7), limit=1000, leader=leader
            )
            assert batch.pruned == {"cancelled": 50}
        finally:
            await conn.close()

    async def test_migrated_schema_has_the_tables(self, empty_database_url) -> None:
        """Migration creates the tasks, events and workers tables and passes check_schema."""
        await migrate_once(empty_database_url)
        conn = await asyncpg.connect(empty_database_url)
        try:
            for table in ("conveyor_tasks", "conveyor_task_events", "conveyor_workers"):
                assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
            assert await migrate.check_schema(conn) == migrate.latest_version() == ALL_VERSIONS[-1]
        finally:
            await conn.close()

    async def test_migrate_refuses_a_newer_database(self, empty_database_url) -> None:
        """migrate() on a database migrated by a newer release that this one cannot run on
        raises SchemaMismatch."""
        await migrate_once(empty_database_url)
        await record_future_migration(empty_database_url)
        conn = await asyncpg.connect(empty_database_url)
        try:
            with pytest.raises(SchemaMismatch, match="newer"):
                await migrate.migrate(conn)
        finally:
            await conn.close()


def bare_config(url: str, **overrides: Any) -> ServerConfig:
    """A server on `url` with no HTTP listener and an ephemeral gRPC port."""
    return ServerConfig(database_url=url, grpc_listen="127.0.0.1:0", http_listen=None, **overrides)


class TestServerSchemaCheck:
    async def test_unmigrated_database_is_refused(self, empty_database_url) -> None:
        """A server on a database with no schema fails to start, telling you to migrate."""
        server = ConveyorServer(bare_config(empty_database_url))
        try:
            with pytest.raises(SchemaMismatch) as caught:
                await server.start(startup_timeout=5)
        finally:
            await server.stop()
        assert "conveyor migrate" in caught.value.message
        assert server.grpc_port is None
        # Refusing to start did not create anything.
        assert await ledger(empty_database_url) == []

    async def test_migrate_flag_migrates_and_starts(self, empty_database_url) -> None:
        """With migrate=True the server applies the schema and starts serving."""
        server = ConveyorServer(bare_config(empty_database_url, migrate=True))
        try:
            await server.start(startup_timeout=5)
            assert server.grpc_port
            ready, checks = await server.readiness()
        finally:
            await server.stop()
        assert ready is True
        assert checks["schema_version"] == migrate.latest_version()
        assert await ledger(empty_database_url) == ALL_VERSIONS

    async def test_newer_database_is_refused(self, empty_database_url) -> None:
        """A server on a database migrated by a newer Conveyor fails with 'newer'."""
        await migrate_once(empty_database_url)
        await record_future_migration(empty_database_url)
        server = ConveyorServer(bare_config(empty_database_url))
        try:
            with pytest.raises(SchemaMismatch) as caught:
                await server.start(startup_timeout=5)
        finally:
            await server.stop()
        assert "newer" in caught.value.message
        assert f"version {ALL_VERSIONS[-1] + 1}" in caught.value.message

    async def test_migrated_database_starts_without_the_flag(self, database_url) -> None:
        """A server on an already migrated database starts without migrate=True."""
        server = ConveyorServer(bare_config(database_url))
        try:
            await server.start(startup_timeout=5)
            ready, _ = await server.readiness()
        finally:
            await server.stop()
        assert ready is True
