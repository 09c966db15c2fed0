"""Leader election among servers sharing one database, and the fencing of leader-only writes.

The maintenance role is a row in `conveyor_leader`; its term is the fencing token of the
reaper's and the sweeper's statements. These tests look at the role from every side an
operator can (/status, /metrics, AdminService.GetLeader, the tables) and call the fenced
statements directly with stale, expired and valid proofs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import AppRole, Db, enqueue_and_claim, holding, wait_for

from conveyor import Client, Task
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.storage import queries

TYPE = "lead.job"
BACKOFF = queries.Backoff(base=timedelta(milliseconds=50), cap=timedelta(milliseconds=400))


def get_json(url: str) -> dict[str, Any]:
    """GET a JSON document from one of our own HTTP endpoints."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own http:// URL
        document: dict[str, Any] = json.loads(response.read())
    return document


def status(server) -> dict[str, Any]:
    """The server's /status document."""
    return get_json(f"{server.http_url}/status")


def server_id(server) -> str:
    """The server's configured id."""
    return str(server.config.server_id)


def metric_value(server, name: str) -> float:
    """The value of an unlabelled metric on the server's /metrics."""
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match[1])


def leader_and_listening_follower(start_server: Any) -> tuple[Any, Any]:
    """A leader, and a follower that LISTENs, both campaigning only every 9 s (a 10 s TTL):
    a quick takeover is a NOTIFY's doing."""
    settings = {
        "leader_ttl": timedelta(seconds=10),
        "leader_retry_interval": timedelta(seconds=9),
    }
    leader = start_server(**settings)
    wait_for(lambda: status(leader)["is_leader"], timeout=5, what="the first server to lead")
    follower = start_server(**settings)
    wait_for(
        lambda: status(follower)["listening_for_notifications"],
        timeout=5,
        what="the follower to LISTEN",
    )
    return leader, follower


@contextlib.contextmanager
def channel_to(address: str) -> Iterator[grpc.Channel]:
    """A raw channel that is closed afterwards."""
    channel = grpc.insecure_channel(address)
    try:
        yield channel
    finally:
        channel.close()


def leased_task(address: str, worker_id: str) -> pb.Lease:
    """Enqueue one task, register `worker_id` and lease the task to it (raw gRPC)."""
    with channel_to(address) as channel:
        tasks = pb_grpc.TaskServiceStub(channel)
        workers = pb_grpc.WorkerServiceStub(channel)
        spec = pb.TaskSpec(
            id=str(uuid.uuid4()),
            type=TYPE,
            payload=b"x",
            timeout=Duration(seconds=60),
            max_retries=3,
        )
        tasks.EnqueueTasks(pb.EnqueueTasksRequest(tasks=[spec]), timeout=10)
        workers.RegisterWorker(
            pb.RegisterWorkerRequest(
                worker_id=worker_id, host="h", pid=1, task_types=[TYPE], concurrency=1, version="t"
            ),
            timeout=10,
        )
        leases = workers.LeaseTasks(
            pb.LeaseTasksRequest(worker_id=worker_id, task_types=[TYPE], max_tasks=1),
            timeout=10,
        ).leases
    assert len(leases) == 1, leases
    return leases[0]


def run_on_connection(url: str, work: Any) -> Any:
    """Run `await work(conn)` on a fresh asyncpg connection (closed afterwards)."""

    async def go() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


def reap(url: str, proof: queries.LeaderProof) -> list[asyncpg.Record]:
    """Call the fenced reaper statement with `proof`."""
    return run_on_connection(
        url, lambda conn: queries.task_reap_expired(conn, limit=10, backoff=BACKOFF, leader=proof)
    )


def sweep(url: str, proof: queries.LeaderProof) -> list[asyncpg.Record]:
    """Call the fenced sweeper statement with `proof` (silence: 10 min)."""
    return run_on_connection(
        url,
        lambda conn: queries.worker_sweep_lost(
            conn, silence=timedelta(minutes=10), leader=proof, reachable_for=timedelta(hours=1)
        ),
    )


def expire_lease(db, task_id: str) -> None:
    """Make the task's lease look expired one second ago."""
    db.execute(
        "UPDATE conveyor_tasks SET lease_expires_at = now() - interval '1 second' "
        "WHERE id = $1::uuid",
        task_id,
    )


def silence_worker(db, worker_id: str) -> None:
    """Make the worker's last heartbeat look an hour old."""
    db.execute(
        "UPDATE conveyor_workers SET last_heartbeat_at = now() - interval '1 hour' WHERE id = $1",
        worker_id,
    )


class TestSingleServer:
    def test_lone_server_becomes_leader_and_says_so_everywhere(self, server) -> None:
        """A server alone on its database leads within moments: /status, /metrics, GetLeader."""
        me = server_id(server)
        document = wait_for(
            lambda: (doc := status(server))["is_leader"] and doc,
            timeout=3,
            what="the lone server to lead",
        )
        assert document["server_id"] == me
        assert document["leader"]["server_id"] == me
        assert document["leader"]["term"] >= 1
        assert document["leader"]["active"] is True

        assert metric_value(server, "conveyor_leader") == 1.0
        assert metric_value(server, "conveyor_leader_term") == document["leader"]["term"]

        with channel_to(server.address) as channel:
            answer = pb_grpc.AdminServiceStub(channel).GetLeader(pb.GetLeaderRequest(), timeout=10)
        assert answer.leader_id == me
        assert answer.server_id == me
        assert answer.term == document["leader"]["term"]
        assert answer.active is True
        assert answer.expires_at.ToDatetime() > answer.elected_at.ToDatetime()


class TestTwoServers:
    def test_one_leader_and_fast_takeover_after_a_graceful_stop(self, start_server, db) -> None:
        """Of two servers exactly one leads; stopping it hands the role over well within the TTL."""
        settings = {
            "leader_ttl": timedelta(seconds=2),
            "leader_retry_interval": timedelta(milliseconds=200),
        }
        first = start_server(**settings)
        second = start_server(**settings)
        servers = [first, second]

        def one_leader() -> bool:
            flags = [status(s)["is_leader"] for s in servers]
            return flags.count(True) == 1

        wait_for(one_leader, timeout=5, what="exactly one of the two servers to lead")
        documents = [status(s) for s in servers]
        assert [doc["is_leader"] for doc in documents].count(True) == 1
        leader, follower = (first, second) if documents[0]["is_leader"] else (second, first)
        old_term = status(leader)["leader"]["term"]
        # Both servers agree on who leads.
        assert {doc["leader"]["server_id"] for doc in documents} == {server_id(leader)}
        # The follower must hear the resignation NOTIFY for the quick takeover.
        wait_for(
            lambda: status(follower)["listening_for_notifications"],
            timeout=5,
            what="the follower to LISTEN",
        )

        leader.stop()
        stopped_at = time.monotonic()
        takeover = wait_for(
            lambda: (doc := status(follower))["is_leader"] and doc,
            timeout=5,
            what="the follower to take over",
        )
        took = time.monotonic() - stopped_at

        assert took < 1.5, f"takeover took {took:.2f}s: the resignation was not acted upon"
        assert takeover["leader"]["server_id"] == server_id(follower)
        assert takeover["leader"]["term"] > old_term

        terms = [
            (row["term"], row["holder"])
            for row in db.fetch(
                "SELECT term, holder FROM conveyor_leader_terms "
                "WHERE name = 'maintenance' ORDER BY term"
            )
        ]
        assert terms == [
            (old_term, server_id(leader)),
            (takeover["leader"]["term"], server_id(follower)),
        ]
        assert len({term for term, _ in terms}) == len(terms)
        row = db.fetch("SELECT holder, term FROM conveyor_leader WHERE name = 'maintenance'")[0]
        assert (row["holder"], row["term"]) == (server_id(follower), takeover["leader"]["term"])

    def test_two_processes_with_one_server_id_never_lead_in_the_same_term(
        self, start_server, db
    ) -> None:
        """A fixed --server-id (a StatefulSet's pod name) given to two live processes: both
        used to renew the role as "its holder", both led in term 1 and both passed the
        (holder, term) fence. Renewal now names the term the process won, so the second
        one follows; once the first stops, the second leads in a new term, so the first's
        proof no longer passes the fence."""
        settings = {
            "server_id": f"fixed-{uuid.uuid4().hex[:6]}",
            "leader_ttl": timedelta(seconds=2),
            "leader_retry_interval": timedelta(milliseconds=100),
        }
        first = start_server(**settings)
        wait_for(lambda: leads(first), timeout=5, what="the first process to lead")
        first_term = status(first)["leader"]["term"]
        second = start_server(**settings)
        wait_for(
            lambda: status(second)["listening_for_notifications"],
            timeout=5,
            what="the second process to LISTEN",
        )
        # Many of the second's campaign rounds (every 100 ms) and the first's renewals
        # (every ttl/3) later, the first still leads alone, in the same term.
        renewed_at = db.fetchval("SELECT expires_at FROM conveyor_leader")
        wait_for(
            lambda: db.fetchval("SELECT expires_at FROM conveyor_leader") > renewed_at,
            timeout=5,
            what="a renewal by the first process",
        )
        assert leads(first)
        assert not leads(second)
        assert db.fetchval("SELECT term FROM conveyor_leader") == first_term

        first.stop()
        wait_for(lambda: leads(second), timeout=5, what="the second process to take over")
        second_term = status(second)["leader"]["term"]
        assert second_term > first_term
        # Two terms, each one process's: the fence (holder, term) tells them apart.
        assert db.fetchval("SELECT count(*) FROM conveyor_leader_terms") == 2

    def test_a_leader_statement_stuck_on_a_lock_gives_up_before_the_role_lapses(
        self, start_server, db, database_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Every leader-only statement holds the leader row FOR SHARE, and renewals wait for
        it: a prune stuck behind a lock once held it past the TTL, the role lapsed and no
        server could take it while the statement waited (maintenance audit). A statement
        now gives up after a third of the TTL, and the leader renews in between."""
        caplog.set_level(logging.INFO, logger="conveyor")
        server = start_server(
            leader_ttl=timedelta(seconds=3),
            leader_retry_interval=timedelta(milliseconds=200),
            retention=timedelta(seconds=1),
            retention_interval=timedelta(milliseconds=200),
            statement_timeout=timedelta(seconds=30),
        )
        elector = server.server.elector
        proof = wait_for(lambda: elector.leadership, what="the server to lead")
        with Client(server.address) as client:
            task_id = client.enqueue_task(Task(type="stuck.prune"))
            client.cancel_task(task_id)

        def stuck_prunes() -> int:
            return sum(
                1
                for record in caplog.records
                if getattr(record, "event", None) == "maintenance_error"
                # Gave up, which is no sign of the database being down: the breaker does
                # not count it (ServerUnavailable would have).
                and record.getMessage().startswith("retention tick failed (LeaderStatementGaveUp")
            )

        # Another session holds the task's history row: the prune's delete waits on it.
        with holding(
            database_url,
            f"SELECT 1 FROM conveyor_task_events WHERE task_id = '{task_id}' FOR UPDATE",  # noqa: S608 - a task id
        ):
            wait_for(
                lambda: stuck_prunes() >= 3,
                timeout=20,
                what="three prunes to give up on the lock (3 s of waiting, the TTL)",
            )
            assert elector.leadership == proof
        assert not [r for r in caplog.records if getattr(r, "event", None) == "leader_lost"]
        # With the lock gone, the next prune goes through.
        wait_for(
            lambda: db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE id = $1", task_id) == 0,
            what="the task to be pruned",
        )

    def test_resignation_notify_wakes_the_follower_without_waiting_for_its_retry(
        self, start_server
    ) -> None:
        """With a 9 s campaign interval, the follower still takes over at once: NOTIFY woke it."""
        leader, follower = leader_and_listening_follower(start_server)
        assert status(follower)["is_leader"] is False
        old_term = status(leader)["leader"]["term"]

        leader.stop()
        stopped_at = time.monotonic()
        takeover = wait_for(
            lambda: (doc := status(follower))["is_leader"] and doc,
            timeout=12,
            what="the follower to take over",
        )
        took = time.monotonic() - stopped_at

        # Without the wake-up the follower would campaign next ~9 s after it started.
        assert took < 1.5, f"takeover took {took:.2f}s: the NOTIFY did not wake the follower"
        assert takeover["leader"]["term"] == old_term + 1

    def test_a_resignation_heard_during_the_followers_campaign_still_wakes_it(
        self, start_server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The leader resigns while the follower's campaign statement is on its way back
        (it found the role held). The follower cleared its wake-up after the campaign, so
        the NOTIFY heard meanwhile was lost, and it waited out its retry interval (9 s here)
        instead of taking over at once. Found by a review."""
        leader, follower = leader_and_listening_follower(start_server)
        held, release = threading.Event(), threading.Event()
        hold_next = threading.Event()
        elect = queries.leader_attempt_elect

        async def elect_then_hold(conn: Any, **params: Any) -> Any:
            row = await elect(conn, **params)
            if params["holder"] == server_id(follower) and hold_next.is_set():
                hold_next.clear()
                held.set()
                await asyncio.to_thread(release.wait, 30)
            return row

        monkeypatch.setattr(queries, "leader_attempt_elect", elect_then_hold)
        hold_next.set()
        follower.server.elector.wake()  # its next campaign now, not in 9 s
        try:
            wait_for(held.is_set, timeout=5, what="the follower's campaign to find the role held")
            leader.stop()  # resigns: the NOTIFY reaches the follower during its campaign
            wait_for(
                follower.server.elector._wake.is_set, timeout=5, what="the follower to hear it"
            )
        finally:
            release.set()
        released_at = time.monotonic()
        wait_for(lambda: status(follower)["is_leader"], timeout=12, what="the takeover")
        took = time.monotonic() - released_at
        assert took < 1.5, f"takeover took {took:.2f}s: the wake-up was lost"


class TestFencedMaintenanceWrites:
    def test_stale_term_or_wrong_holder_writes_nothing(
        self, start_server, db, database_url: str
    ) -> None:
        """The reaper and sweeper statements change nothing unless (holder, term) is current."""
        # Maintenance ticks once at start, then not for an hour: the test drives it by hand.
        server = start_server(reaper_interval=timedelta(hours=1))
        wait_for(lambda: status(server)["is_leader"], timeout=5, what="the server to lead")
        row = db.fetch("SELECT holder, term FROM conveyor_leader WHERE name = 'maintenance'")[0]
        holder, term = row["holder"], int(row["term"])
        assert holder == server_id(server)

        reaped_lease = leased_task(server.address, "w-reap")
        expire_lease(db, reaped_lease.task_id)
        swept_lease = leased_task(server.address, "w-sweep")
        silence_worker(db, "w-sweep")
        swept_before = dict(db.task(swept_lease.task_id))

        stale = [
            queries.LeaderProof(holder=holder, term=term - 1),
            queries.LeaderProof(holder=holder, term=term + 1),
            queries.LeaderProof(holder=holder, term=999),
            queries.LeaderProof(holder="someone-else", term=term),
        ]
        for proof in stale:
            assert reap(database_url, proof) == [], proof
            assert sweep(database_url, proof) == [], proof
        reaped_row = db.task(reaped_lease.task_id)
        assert (reaped_row["state"], str(reaped_row["lease_id"])) == (
            "running",
            reaped_lease.lease_id,
        )
        assert [e["event"] for e in db.events(reaped_lease.task_id)] == ["enqueued", "started"]
        assert db.fetchval("SELECT state FROM conveyor_workers WHERE id = 'w-sweep'") == "active"
        assert dict(db.task(swept_lease.task_id)) == swept_before

        valid = queries.LeaderProof(holder=holder, term=term)
        swept = sweep(database_url, valid)
        assert [(r["id"], r["leases"]) for r in swept] == [("w-sweep", 1)]
        assert db.fetchval("SELECT state FROM conveyor_workers WHERE id = 'w-sweep'") == "lost"
        assert db.fetchval(
            "SELECT lease_expires_at <= now() FROM conveyor_tasks WHERE id = $1::uuid",
            swept_lease.task_id,
        )

        reaped = reap(database_url, valid)
        assert sorted(str(r["id"]) for r in reaped) == sorted(
            [reaped_lease.task_id, swept_lease.task_id]
        )
        for lease in (reaped_lease, swept_lease):
            row = db.task(lease.task_id)
            # Scheduled for its retry (publicly QUEUED), with no lease.
            assert (row["state"], row["lease_id"]) == ("scheduled", None)
            assert db.events(lease.task_id)[-1]["event"] == "lease_expired"

    def test_expired_leader_lease_writes_nothing(self, db, database_url: str) -> None:
        """A proof naming the right holder and term is refused once the role's lease has lapsed."""
        # No server runs here: nobody renews or takes over the role behind the test's back.
        holder, term = "paused-leader", 7

        async def seed(conn: Any) -> tuple[str, str]:
            await queries.task_insert_many(
                conn,
                [
                    queries.NewTask(
                        id=str(uuid.uuid4()),
                        type=TYPE,
                        payload=b"x",
                        timeout=timedelta(seconds=60),
                        max_retries=3,
                    )
                    for _ in range(2)
                ],
            )
            for worker_id in ("w-reap", "w-sweep"):
                await queries.worker_register(
                    conn,
                    worker_id=worker_id,
                    host="h",
                    pid=1,
                    task_types=[TYPE],
                    concurrency=1,
                    version="t",
                    principal=None,
                    gone_after=timedelta(seconds=15),
                    lease_ttl=timedelta(seconds=30),
                )
            claimed = [
                await queries.task_claim(
                    conn,
                    task_types=[TYPE],
                    limit=1,
                    worker_id=worker_id,
                    lease_ttl=timedelta(seconds=30),
                    deadline_grace=timedelta(seconds=10),
                )
                for worker_id in ("w-reap", "w-sweep")
            ]
            return str(claimed[0].rows[0]["id"]), str(claimed[1].rows[0]["id"])

        reaped_id, swept_id = run_on_connection(database_url, seed)
        expire_lease(db, reaped_id)
        silence_worker(db, "w-sweep")
        db.execute(
            "INSERT INTO conveyor_leader (name, holder, term, elected_at, expires_at) "
            "VALUES ('maintenance', $1, $2, now() - interval '1 minute', "
            "now() - interval '1 second')",
            holder,
            term,
        )
        proof = queries.LeaderProof(holder=holder, term=term)
        swept_before = dict(db.task(swept_id))

        assert reap(database_url, proof) == []
        assert sweep(database_url, proof) == []
        assert db.task(reaped_id)["state"] == "running"
        assert db.fetchval("SELECT state FROM conveyor_workers WHERE id = 'w-sweep'") == "active"
        assert dict(db.task(swept_id)) == swept_before

        # The same proof works while the lease is live: the refusal above was the lapse.
        db.execute(
            "UPDATE conveyor_leader SET expires_at = now() + interval '1 minute' "
            "WHERE name = 'maintenance'"
        )
        assert [(r["id"], r["leases"]) for r in sweep(database_url, proof)] == [("w-sweep", 1)]
        assert sorted(str(r["id"]) for r in reap(database_url, proof)) == sorted(
            [reaped_id, swept_id]
        )
        # Both scheduled for their retry (publicly QUEUED).
        assert db.task(reaped_id)["state"] == "scheduled"
        assert db.task(swept_id)["state"] == "scheduled"


class TestReservedPool:
    def test_heartbeat_succeeds_while_the_main_pool_is_exhausted(self, start_server, db) -> None:
        """With every main-pool connection held, a Heartbeat still answers via the priority pool."""
        # Maintenance would time out on the exhausted pool and count towards the database
        # breaker; keep it idle so this test sees only the pool behaviour.
        server = start_server(
            pool_max_size=2,
            pool_acquire_timeout=timedelta(seconds=1),
            reaper_interval=timedelta(hours=1),
        )
        database = server.server.database
        with channel_to(server.address) as channel:
            workers = pb_grpc.WorkerServiceStub(channel)
            tasks = pb_grpc.TaskServiceStub(channel)
            workers.RegisterWorker(
                pb.RegisterWorkerRequest(
                    worker_id="w-pool", host="h", pid=1, task_types=[TYPE], concurrency=1
                ),
                timeout=10,
            )

            async def hold_both() -> list[Any]:
                pool = database._pool
                return [await pool.acquire(timeout=5) for _ in range(pool.get_max_size())]

            held = server.call(hold_both)
            try:
                assert len(held) == 2
                assert database.pool_in_use() == 2
                # The main pool really is exhausted: a request that needs it gives up.
                with pytest.raises(grpc.RpcError) as caught:
                    tasks.GetTask(pb.GetTaskRequest(task_id=str(uuid.uuid4())), timeout=10)
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE

                started = time.monotonic()
                response = workers.Heartbeat(
                    pb.HeartbeatRequest(worker_id="w-pool", in_flight=0), timeout=5
                )
                took = time.monotonic() - started
            finally:

                async def release_all() -> None:
                    for conn in held:
                        await database._pool.release(conn)

                server.call(release_all)

        assert list(response.stop) == []
        assert took < 1.0, f"the heartbeat took {took:.2f}s"
        assert db.fetchval("SELECT state FROM conveyor_workers WHERE id = 'w-pool'") == "active"

    def test_producers_timing_out_on_the_main_pool_do_not_cut_off_heartbeats(
        self, start_server, db
    ) -> None:
        """A burst of requests timing out on the exhausted main pool leaves heartbeats working."""
        server = start_server(
            pool_max_size=2,
            pool_acquire_timeout=timedelta(seconds=1),
            reaper_interval=timedelta(hours=1),
        )
        database = server.server.database
        burst = database.breaker.policy.failure_threshold + 1
        with channel_to(server.address) as channel:
            workers = pb_grpc.WorkerServiceStub(channel)
            tasks = pb_grpc.TaskServiceStub(channel)
            workers.RegisterWorker(
                pb.RegisterWorkerRequest(
                    worker_id="w-burst", host="h", pid=1, task_types=[TYPE], concurrency=1
                ),
                timeout=10,
            )

            async def hold_both() -> list[Any]:
                pool = database._pool
                return [await pool.acquire(timeout=5) for _ in range(pool.get_max_size())]

            held = server.call(hold_both)
            try:
                # More producers than the breaker's threshold, all waiting on the pool at once.
                calls = [
                    tasks.GetTask.future(pb.GetTaskRequest(task_id=str(uuid.uuid4())), timeout=10)
                    for _ in range(burst)
                ]
                codes = []
                for call in calls:
                    with pytest.raises(grpc.RpcError) as caught:
                        call.result()
                    codes.append(caught.value.code())
                assert codes == [grpc.StatusCode.UNAVAILABLE] * burst

                started = time.monotonic()
                try:
                    response = workers.Heartbeat(
                        pb.HeartbeatRequest(worker_id="w-burst"), timeout=5
                    )
                    outcome: Any = list(response.stop)
                except grpc.RpcError as error:
                    outcome = (error.code(), error.details())
                took = time.monotonic() - started
            finally:

                async def release_all() -> None:
                    for conn in held:
                        await database._pool.release(conn)

                server.call(release_all)

        assert outcome == [], f"the heartbeat was refused: {outcome}"
        assert took < 1.0, f"the heartbeat took {took:.2f}s"


def leads(server) -> bool:
    """Whether the server's elector says it leads (asked on the server's own loop)."""

    async def ask() -> bool:
        return bool(server.server.elector.is_leader)

    return bool(server.call(ask))


class TestDatabaseRefusingTheServer:
    @pytest.mark.parametrize(
        ("refuse", "restore"),
        [
            pytest.param("CONNECTION LIMIT 0", "CONNECTION LIMIT -1", id="too-many-connections"),
            pytest.param("NOLOGIN", "LOGIN", id="login-refused"),
        ],
    )
    def test_the_elector_outlives_the_refusal_and_the_reaper_catches_up(
        self, app_role: AppRole, start_server, refuse: str, restore: str
    ) -> None:
        """While PostgreSQL refuses the server's connections for longer than the leader's
        TTL (53300, too many connections: the storm after a restart; 28000, a role that
        may not log in: a configuration error), the elector keeps campaigning. Once
        connections are accepted again the server leads again, and the reaper re-queues a
        lease that expired during the refusal."""
        server = start_server(
            database_url=app_role.url,
            leader_ttl=timedelta(seconds=1.5),
            leader_retry_interval=timedelta(milliseconds=100),
            db_breaker_reset=timedelta(milliseconds=200),
        )
        wait_for(lambda: leads(server), timeout=5, what="the server to lead")
        admin = Db(app_role.admin_url)
        with app_role.refused(refuse, restore):
            # No renewal got through for a whole TTL: the server stepped down.
            wait_for(lambda: not leads(server), timeout=10, what="the server to step down")
            task_id = str(uuid.uuid4())
            run_on_connection(
                app_role.admin_url,
                lambda conn: enqueue_and_claim(conn, TYPE, [task_id], "vanished-worker"),
            )
            expire_lease(admin, task_id)
        wait_for(lambda: leads(server), timeout=10, what="the server to lead again")
        wait_for(
            lambda: admin.task(task_id)["state"] == "queued",
            timeout=10,
            what="the expired lease to be reaped",
        )
        assert admin.events(task_id)[-1]["event"] == "lease_expired"


def test_a_leader_only_transaction_left_idle_ends_within_its_budget(db: Db) -> None:
    """A leader frozen between its statement and its COMMIT (SIGSTOP, a paused VM) kept the
    leader row locked, and every election waited behind it until the session's own idle
    timeout (30 s) ended it: a CI run saw the takeover miss its bound that way. The budget
    set for a leader-only statement now bounds the idle transaction too."""

    async def leave_idle() -> asyncpg.Connection:
        conn = await asyncpg.connect(db.url)
        transaction = conn.transaction()
        await transaction.start()
        await queries.statement_timeout_set_local(conn, budget=timedelta(milliseconds=300))
        await conn.fetchval("SELECT 1 FROM conveyor_leader FOR SHARE")
        # The connection stays open, its transaction idle, as a frozen leader's would.
        return conn

    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(leave_idle())
    pid = conn.get_server_pid()
    try:
        wait_for(
            lambda: not db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid),
            timeout=10,
            what="PostgreSQL to end the idle leader-only transaction",
        )
    finally:
        with contextlib.suppress(Exception):  # the server may have ended it already
            loop.run_until_complete(conn.close(timeout=5))
        loop.close()
