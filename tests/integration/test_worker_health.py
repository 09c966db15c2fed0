"""Worker health as the server sees it: heartbeats, the lost-worker sweeper, draining,
event-loop lag, handler progress, and the `conveyor workers` listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import (
    FAKETIME_ENV,
    enqueue_and_claim,
    process_env,
    running,
    wait_final,
    wait_for,
)

from conveyor import Client, Task, TaskState, Worker
from conveyor.errors import ServerUnavailable
from conveyor.protocol.limits import MAX_HEARTBEAT_LEASES
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server.worker_service import WorkerService
from conveyor.storage import queries
from conveyor.types import new_task_ids

TYPE = "health.job"


@contextlib.contextmanager
def stubs(address: str) -> Iterator[tuple[pb_grpc.TaskServiceStub, pb_grpc.WorkerServiceStub]]:
    """Raw TaskService and WorkerService stubs on a channel closed afterwards."""
    channel = grpc.insecure_channel(address)
    try:
        yield pb_grpc.TaskServiceStub(channel), pb_grpc.WorkerServiceStub(channel)
    finally:
        channel.close()


def worker_row(db, worker_id: str) -> Any:
    """The worker's row in conveyor_workers (None if absent)."""
    rows = db.fetch("SELECT * FROM conveyor_workers WHERE id = $1", worker_id)
    return rows[0] if rows else None


class TestSweeper:
    async def test_the_sweep_skips_a_lease_another_statement_holds(self, database_url) -> None:
        """A lost worker's leases end at once, except one whose row another transaction
        holds (a late report of the worker, an operator's cancel): the sweep skips it rather
        than wait, so it cannot deadlock with such a statement, and the reaper ends that
        lease when it expires."""
        conn = await asyncpg.connect(database_url)
        holder = await asyncpg.connect(database_url)
        try:
            registered = await queries.worker_register(
                conn,
                worker_id="w-gone",
                host="h",
                pid=1,
                task_types=["sweep.t"],
                concurrency=3,
                version="test",
                principal=None,
                gone_after=timedelta(seconds=15),
                lease_ttl=timedelta(seconds=30),
            )
            assert registered
            ids = new_task_ids(3)
            await enqueue_and_claim(conn, "sweep.t", ids, "w-gone")
            await conn.execute(
                "UPDATE conveyor_workers SET last_heartbeat_at = now() - interval '1 minute' "
                "WHERE id = 'w-gone'"
            )
            elected = await queries.leader_attempt_elect(
                conn, name="maintenance", holder="sweep-test", ttl=timedelta(seconds=30), term=None
            )
            assert elected is not None
            leader = queries.LeaderProof("sweep-test", elected["term"])
            held = holder.transaction()
            await held.start()
            try:
                await holder.execute(
                    "SELECT 1 FROM conveyor_tasks WHERE id = $1::uuid FOR UPDATE", ids[1]
                )
                swept = await asyncio.wait_for(
                    queries.worker_sweep_lost(
                        conn,
                        silence=timedelta(seconds=15),
                        leader=leader,
                        reachable_for=timedelta(hours=1),
                    ),
                    timeout=10,
                )
            finally:
                await held.rollback()
            assert [(row["id"], row["leases"]) for row in swept] == [("w-gone", 2)]
            ended = {
                str(row["id"]): row["ended"]
                for row in await conn.fetch(
                    "SELECT id, lease_expires_at <= now() AS ended FROM conveyor_tasks "
                    "WHERE id = ANY($1::uuid[])",
                    ids,
                )
            }
            assert ended == {ids[0]: True, ids[1]: False, ids[2]: True}
        finally:
            await holder.close()
            await conn.close()

    def test_silent_worker_is_marked_lost_and_its_lease_released_early(
        self, start_server, db, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A worker silent past worker_lost_after is lost; its task is requeued long before 30 s."""
        caplog.set_level(logging.WARNING, logger="conveyor.server.sweeper")
        server = start_server(
            worker_lost_after=timedelta(seconds=1),
            heartbeat_interval=timedelta(milliseconds=400),
            reaper_interval=timedelta(milliseconds=100),
        )
        with stubs(server.address) as (tasks, workers):
            task_id = str(uuid.uuid4())
            tasks.EnqueueTasks(
                pb.EnqueueTasksRequest(
                    tasks=[
                        pb.TaskSpec(
                            id=task_id,
                            type=TYPE,
                            payload=b"x",
                            timeout=Duration(seconds=120),
                            max_retries=3,
                        )
                    ]
                ),
                timeout=10,
            )
            workers.RegisterWorker(
                pb.RegisterWorkerRequest(
                    worker_id="w-silent", host="h", pid=1, task_types=[TYPE], concurrency=1
                ),
                timeout=10,
            )
            [lease] = workers.LeaseTasks(
                pb.LeaseTasksRequest(worker_id="w-silent", task_types=[TYPE], max_tasks=1),
                timeout=10,
            ).leases
            leased_at = time.monotonic()
            lease_ends_in = db.fetchval(
                "SELECT extract(epoch FROM lease_expires_at - now()) FROM conveyor_tasks "
                "WHERE id = $1::uuid",
                task_id,
            )
            assert lease_ends_in > 25  # the default 30 s lease

            wait_for(
                lambda: worker_row(db, "w-silent")["state"] == "lost",
                timeout=10,
                what="the silent worker to be marked lost",
            )
            # The log says how long it was silent, not the threshold (every line read
            # "15.0s" in a review, for silences of 15.5 to 20 s).
            [lost] = [r for r in caplog.records if getattr(r, "event", "") == "worker_lost"]
            silent = float(re.search(r"was silent for ([\d.]+)s", lost.getMessage())[1])
            assert silent >= 1.0, lost.getMessage()
            assert "(lost after 1.0s)" in lost.getMessage()

            def requeued() -> bool:
                row = db.task(task_id)
                events = [event["event"] for event in db.events(task_id)]
                return row["state"] == "queued" and "lease_expired" in events

            wait_for(requeued, timeout=10, what="the lost worker's task to be requeued")
            took = time.monotonic() - leased_at
            assert took < 5, f"the task came back after {took:.1f}s"
            row = db.task(task_id)
            assert (row["lease_id"], row["attempt"]) == (None, 1)
            expired = db.events(task_id)[-1]
            assert (expired["event"], expired["state"], expired["worker_id"]) == (
                "lease_expired",
                "scheduled",  # waiting out its backoff; publicly QUEUED
                "w-silent",
            )

            beat = workers.Heartbeat(
                pb.HeartbeatRequest(
                    worker_id="w-silent",
                    leases=[pb.LeaseRef(task_id=lease.task_id, lease_id=lease.lease_id)],
                ),
                timeout=10,
            )
            revived = worker_row(db, "w-silent")

        assert [(s.task_id, s.lease_id, s.reason) for s in beat.stop] == [
            (task_id, lease.lease_id, pb.STOP_REASON_LEASE_LOST)
        ]
        assert revived["state"] == "active"
        assert db.task(task_id)["state"] == "queued"


class TestDraining:
    def test_draining_worker_shows_draining_then_stopped_with_in_flight(
        self, start_server, db
    ) -> None:
        """A draining Worker's row says draining (in_flight = running handlers), then stopped."""
        server = start_server(
            heartbeat_interval=timedelta(milliseconds=200), lease_ttl=timedelta(seconds=5)
        )
        release = threading.Event()
        started = threading.Semaphore(0)

        def blocking(_ctx: Any, payload: bytes) -> bytes:
            started.release()
            assert release.wait(30), "the test never released the handler"
            return payload

        worker = Worker(server.address, concurrency=3)
        worker.register_handler(TYPE, blocking)
        stopper: threading.Thread | None = None
        with running(worker), Client(server.address) as client:
            try:
                ids = [client.enqueue_task(Task(type=TYPE, payload=b"p")) for _ in range(2)]
                for _ in ids:
                    assert started.acquire(timeout=10), "a handler did not start"
                wait_for(
                    lambda: worker_row(db, worker.worker_id)["in_flight"] == 2,
                    timeout=5,
                    what="in_flight to report the two running handlers",
                )
                assert worker_row(db, worker.worker_id)["state"] == "active"

                stopper = threading.Thread(target=worker.stop, name="stopper")
                stopper.start()
                draining = wait_for(
                    lambda: (
                        (row := worker_row(db, worker.worker_id))["state"] == "draining" and row
                    ),
                    timeout=5,
                    what="the worker row to say draining",
                )
                assert draining["in_flight"] == 2
                assert stopper.is_alive(), "stop() returned while handlers were still blocked"
            finally:
                release.set()
                if stopper is not None:
                    stopper.join(30)
            assert stopper is not None
            assert not stopper.is_alive()
            statuses = [wait_final(client, task_id) for task_id in ids]

        assert [s.state for s in statuses] == [TaskState.SUCCEEDED] * 2
        final = worker_row(db, worker.worker_id)
        assert final["state"] == "stopped"


class TestLoopLag:
    def test_blocking_async_handler_is_reported_as_loop_lag(
        self, server, client: Client, db, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An async handler that blocks the loop shows up as loop_lag_ms >= 1000 and a warning."""
        caplog.set_level(logging.WARNING, logger="conveyor.worker.watchdog")

        async def blocker(_ctx: Any, _payload: bytes) -> bytes:
            time.sleep(1.5)  # noqa: ASYNC251 - blocks the event loop on purpose
            return b"done"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler(TYPE, blocker)
        with running(worker):
            task_id = client.enqueue_task(Task(type=TYPE))
            assert wait_final(client, task_id).state is TaskState.SUCCEEDED

            # The worst lag is reported once, with the next heartbeat: catch both views of it
            # before a later heartbeat replaces it.
            def lag_reported() -> tuple[int, int] | None:
                row = worker_row(db, worker.worker_id)
                listed = {w.id: w for w in client.list_workers()}.get(worker.worker_id)
                if row["loop_lag_ms"] >= 1000 and listed and listed.loop_lag_ms >= 1000:
                    return row["loop_lag_ms"], listed.loop_lag_ms
                return None

            row_lag, listed_lag = wait_for(
                lag_reported, timeout=15, interval=0.05, what="loop_lag_ms >= 1000"
            )

        assert 1000 <= row_lag < 10_000
        assert 1000 <= listed_lag < 10_000
        warnings = [
            record
            for record in caplog.records
            if record.name == "conveyor.worker.watchdog" and record.levelno == logging.WARNING
        ]
        assert any("blocked" in record.getMessage() for record in warnings), [
            record.getMessage() for record in caplog.records
        ]
        assert any(record.threadName == "conveyor-loop-watchdog" for record in warnings)


class TestProgress:
    def test_ctx_heartbeat_records_progress_at_once(self, server, client: Client) -> None:
        """ctx.heartbeat("step 1 of 3") reaches the task within 2 s (not the 3 s interval)."""
        release = threading.Event()
        reported = threading.Event()
        seen: dict[str, Any] = {}

        def handler(ctx: Any, _payload: bytes) -> bytes:
            try:
                ctx.heartbeat(123)
            except TypeError as exc:
                seen["type_error"] = exc
            ctx.heartbeat("step 1 of 3")
            seen["reported_at"] = time.monotonic()
            reported.set()
            assert release.wait(30), "the test never released the handler"
            return b"ok"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler(TYPE, handler)
        with running(worker):
            try:
                task_id = client.enqueue_task(Task(type=TYPE))
                assert reported.wait(10), "the handler did not run"
                status = wait_for(
                    lambda: (s := client.get_task_status(task_id)).progress == "step 1 of 3" and s,
                    timeout=10,
                    what="the progress report to reach the task",
                )
                arrived_after = time.monotonic() - seen["reported_at"]
            finally:
                release.set()
            final = wait_final(client, task_id)

        assert arrived_after < 2.0, f"progress arrived after {arrived_after:.2f}s"
        assert status.state is TaskState.RUNNING
        assert status.progress_at is not None
        assert status.started_at is not None
        assert status.progress_at >= status.started_at
        assert isinstance(seen.get("type_error"), TypeError)
        assert final.state is TaskState.SUCCEEDED

    @pytest.mark.parametrize("kind", ["def", "async def"])
    def test_the_last_note_before_returning_is_kept(
        self, server, client: Client, kind: str
    ) -> None:
        """A handler that reports "3 of 3 pages" and returns finishes before the next
        heartbeat, and heartbeats leave a finished attempt out: the note was never stored,
        and the task that succeeded said "2 of 3 pages" (found following getting-started's
        `reports.render`). An async handler's note was not even recorded before its
        outcome was sent."""

        def pages(ctx: Any) -> None:
            for page in range(1, 4):
                ctx.heartbeat(f"{page} of 3 pages")

        def sync_handler(ctx: Any, _payload: bytes) -> bytes:
            pages(ctx)
            return b"ok"

        async def async_handler(ctx: Any, _payload: bytes) -> bytes:
            pages(ctx)
            return b"ok"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler(TYPE, sync_handler if kind == "def" else async_handler)
        with running(worker):
            task_ids = client.enqueue_tasks([Task(type=TYPE) for _ in range(3)])
            finals = [wait_final(client, task_id) for task_id in task_ids]

        assert [(f.state, f.progress) for f in finals] == [
            (TaskState.SUCCEEDED, "3 of 3 pages")
        ] * 3


class TestLeasesPerHeartbeat:
    def test_the_server_refuses_a_heartbeat_naming_too_many_leases(self, server) -> None:
        """One worker token once slowed every worker's beats with 50,000 refs a call."""
        refs = [
            pb.LeaseRef(task_id=task_id, lease_id=str(uuid.uuid4()))
            for task_id in new_task_ids(MAX_HEARTBEAT_LEASES + 1)
        ]
        with stubs(server.address) as (_, workers):
            workers.RegisterWorker(
                pb.RegisterWorkerRequest(worker_id="w-many", task_types=[TYPE], concurrency=1),
                timeout=10,
            )
            with pytest.raises(grpc.RpcError) as refused:
                workers.Heartbeat(pb.HeartbeatRequest(worker_id="w-many", leases=refs), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"the limit is {MAX_HEARTBEAT_LEASES}" in (refused.value.details() or "")
            # At the limit: answered (none of these leases exists, so each is to stop).
            beat = workers.Heartbeat(
                pb.HeartbeatRequest(worker_id="w-many", leases=refs[:MAX_HEARTBEAT_LEASES]),
                timeout=30,
            )
            assert len(beat.stop) == MAX_HEARTBEAT_LEASES

    def test_a_worker_holding_more_splits_its_beat(
        self, server, client: Client, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Five leases, two a call: every one is still heartbeated (its progress arrives)."""
        # The server runs in this process: both ends take the lower limit.
        monkeypatch.setattr("conveyor.worker.runtime.MAX_HEARTBEAT_LEASES", 2)
        monkeypatch.setattr("conveyor.server.worker_service.MAX_HEARTBEAT_LEASES", 2)
        release = threading.Event()

        def handler(ctx: Any, payload: bytes) -> bytes:
            ctx.heartbeat(f"holding {payload.decode()}")
            assert release.wait(30), "the test never released the handler"
            return b"ok"

        worker = Worker(server.address, concurrency=5)
        worker.register_handler(TYPE, handler)
        with running(worker):
            try:
                ids = client.enqueue_tasks(
                    [Task(type=TYPE, payload=str(n).encode()) for n in range(5)]
                )
                for n, task_id in enumerate(ids):
                    wait_for(
                        lambda task_id=task_id, n=n: (
                            client.get_task_status(task_id).progress == f"holding {n}"
                        ),
                        timeout=15,
                        what=f"task {n}'s progress to arrive by heartbeat",
                    )
            finally:
                release.set()
            assert all(wait_final(client, i).state is TaskState.SUCCEEDED for i in ids)

    def test_a_stop_order_holds_when_a_later_call_of_the_beat_fails(
        self, start_server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Four leases, two a call. The server answers the first call of each beat, which
        names a cancelled task, and fails the second (an injected UNAVAILABLE). The worker
        once returned on the failure without acting on the first call's answer: the
        cancelled handler ran on until a whole lease of silence. It now stops at once."""
        monkeypatch.setattr("conveyor.worker.runtime.MAX_HEARTBEAT_LEASES", 2)
        monkeypatch.setattr("conveyor.server.worker_service.MAX_HEARTBEAT_LEASES", 2)
        ids = sorted(new_task_ids(4))  # a beat's calls go in task id order
        later_call = set(ids[2:])
        beating = WorkerService.Heartbeat

        async def second_call_fails(
            service: WorkerService, request: pb.HeartbeatRequest, context: Any
        ) -> pb.HeartbeatResponse:
            if any(lease.task_id in later_call for lease in request.leases):
                raise ServerUnavailable("injected: the beat's second call fails")
            return await beating(service, request, context)

        monkeypatch.setattr(WorkerService, "Heartbeat", second_call_fails)
        lease = timedelta(seconds=60)  # silence would stop nothing within the test
        server = start_server(lease_ttl=lease, heartbeat_interval=timedelta(milliseconds=200))
        contexts: dict[str, Any] = {}
        release = threading.Event()

        def handler(ctx: Any, _payload: bytes) -> bytes:
            contexts[ctx.task_id] = ctx
            assert release.wait(30), "the test never released the handler"
            return b"ok"

        worker = Worker(server.address, concurrency=4)
        worker.register_handler(TYPE, handler)
        with running(worker), Client(server.address) as client:
            try:
                client.enqueue_tasks([Task(type=TYPE, id=task_id) for task_id in ids])
                wait_for(lambda: len(contexts) == 4, timeout=15, what="all four handlers")
                client.cancel_task(ids[0])
                wait_for(
                    contexts[ids[0]].cancelled.is_set,
                    timeout=10,
                    what="the cancelled handler to be told, though its beat's second call failed",
                )
                assert not any(contexts[i].cancelled.is_set() for i in ids[1:])
            finally:
                release.set()
            assert client.get_task_status(ids[0]).state is TaskState.CANCELLED


class TestTextProtobufCannotCarry:
    """A file name that did not decode (os.fsdecode) holds lone surrogates, which protobuf
    refuses to encode. In a progress note it once ended the worker's heartbeat loop for good
    (every lease of the worker expired from then on); in an error it lost the report."""

    UNDECODABLE = os.fsdecode(b"caf\xe9.csv")

    def test_an_undecodable_progress_note_keeps_the_heartbeats_going(self, start_server) -> None:
        lease = timedelta(seconds=1.5)
        server = start_server(lease_ttl=lease, heartbeat_interval=timedelta(milliseconds=300))
        noted, may_end = threading.Event(), threading.Event()
        attempts: list[int] = []

        def reads_a_file(ctx: Any, _payload: bytes) -> bytes:
            attempts.append(ctx.attempt)
            ctx.heartbeat(f"reading {self.UNDECODABLE}")
            noted.set()
            assert may_end.wait(30), "the test never let the handler end"
            return b"read"

        worker = Worker(server.address, concurrency=1)
        worker.register_handler(TYPE, reads_a_file)
        with running(worker), Client(server.address) as client:
            try:
                task_id = client.enqueue_task(Task(type=TYPE, timeout=timedelta(seconds=30)))
                assert noted.wait(10), "the handler did not run"
                progress = wait_for(
                    lambda: client.get_task_status(task_id).progress,
                    what="the progress note to reach the task",
                )
                # Three leases long: only heartbeats keep the attempt's lease.
                noted_at = time.monotonic()
                wait_for(
                    lambda: time.monotonic() - noted_at > 3 * lease.total_seconds(),
                    what="three leases to pass",
                )
            finally:
                may_end.set()
            status = wait_final(client, task_id)

        assert progress == "reading caf\\udce9.csv"
        assert status.state is TaskState.SUCCEEDED
        assert attempts == [1]
        assert [e.event for e in status.history] == ["enqueued", "started", "succeeded"]

    def test_an_undecodable_error_is_reported(self, server, client: Client) -> None:
        worker = Worker(server.address, concurrency=1)

        @worker.handler(TYPE)
        def opens_a_file(_ctx: Any, _payload: bytes) -> bytes:
            raise FileNotFoundError(f"no such file: {self.UNDECODABLE}")

        with running(worker):
            task_id = client.enqueue_task(Task(type=TYPE, max_retries=0))
            status = wait_final(client, task_id)

        assert status.state is TaskState.FAILED
        assert status.last_error == "FileNotFoundError: no such file: caf\\udce9.csv"
        assert [e.event for e in status.history] == ["enqueued", "started", "failed"]


class TestWorkersCommand:
    def test_cli_lists_a_running_worker(self, server) -> None:
        """`conveyor workers` (JSON and table) lists a running worker, active, with its types."""
        worker = Worker(server.address, concurrency=2, worker_id=f"cli-{uuid.uuid4().hex[:8]}")
        worker.register_handler(TYPE, lambda _ctx, payload: payload)
        worker.register_handler("health.other", lambda _ctx, payload: payload)
        env = process_env(COLUMNS="250")
        base = [sys.executable, "-m", "conveyor", "workers", "--server", server.address]
        with running(worker):
            as_json = subprocess.run(
                [*base, "--json"], capture_output=True, text=True, timeout=60, env=env, check=False
            )
            as_table = subprocess.run(
                base, capture_output=True, text=True, timeout=60, env=env, check=False
            )

        assert as_json.returncode == 0, as_json.stderr
        listed = {entry["id"]: entry for entry in json.loads(as_json.stdout)["workers"]}
        assert worker.worker_id in listed, listed
        entry = listed[worker.worker_id]
        assert entry["state"] == "active"
        assert sorted(entry["task_types"]) == sorted([TYPE, "health.other"])
        assert entry["concurrency"] == 2
        assert entry["in_flight"] == 0

        assert as_table.returncode == 0, as_table.stderr
        assert worker.worker_id in as_table.stdout, as_table.stdout

    def test_heartbeat_ages_do_not_depend_on_the_operators_clock(self, server, faketime) -> None:
        """Run on a machine whose clock is 10 minutes ahead, `conveyor workers` shows a live
        worker's last heartbeat seconds ago, not 10 minutes: the age is the server's
        (`silent_for`, by the database's clock, which also judges when a worker is lost).
        It was the operator's clock minus the server's timestamp."""
        worker = Worker(server.address, concurrency=1, worker_id=f"cli-{uuid.uuid4().hex[:8]}")
        worker.register_handler(TYPE, lambda _ctx, payload: payload)
        env = process_env(COLUMNS="250", **FAKETIME_ENV)
        skewed = [faketime, "-f", "+10m", sys.executable, "-m", "conveyor", "workers"]
        skewed += ["--server", server.address]
        with running(worker):
            as_table = subprocess.run(
                skewed, capture_output=True, text=True, timeout=60, env=env, check=False
            )
            as_json = subprocess.run(
                [*skewed, "--json"],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
                check=False,
            )

        # Well under the 600 s of skew; a live worker heartbeats every few seconds.
        assert as_table.returncode == 0, as_table.stderr
        (row,) = [line for line in as_table.stdout.splitlines() if worker.worker_id in line]
        ago = re.search(r"(\d+\.\d)s ago", row)
        assert ago is not None, row
        assert float(ago[1]) < 60, row
        assert as_json.returncode == 0, as_json.stderr
        listed = {entry["id"]: entry for entry in json.loads(as_json.stdout)["workers"]}
        assert 0 <= listed[worker.worker_id]["silent_for_seconds"] < 60, listed


class TestAGoodbyeIsFinal:
    def test_a_late_draining_heartbeat_leaves_a_stopped_worker_stopped(self, server, db) -> None:
        """A worker's last heartbeat (draining) may still be in flight on another server when
        its goodbye commits. It must not bring the worker back as draining: the sweeper then
        marked it lost 15 s later, counting a clean stop as a lost worker."""
        with stubs(server.address) as (_, workers):
            workers.RegisterWorker(
                pb.RegisterWorkerRequest(
                    worker_id="w-goodbye", host="h", pid=1, task_types=[TYPE], concurrency=1
                ),
                timeout=10,
            )
            workers.UnregisterWorker(pb.UnregisterWorkerRequest(worker_id="w-goodbye"), timeout=10)
            workers.Heartbeat(pb.HeartbeatRequest(worker_id="w-goodbye", draining=True), timeout=10)
        state = db.fetchval("SELECT state FROM conveyor_workers WHERE id = 'w-goodbye'")
        assert state == "stopped"
