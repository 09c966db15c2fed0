"""PostgreSQL crashes under load, and every server connection is terminated.

`pg_ctl stop -m immediate` needs the embedded cluster (skipped with an external one).
"""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest
from helpers import wait_final, wait_for

from conveyor import Task, TaskState
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

OUTAGE = 2.0  # seconds PostgreSQL stays down
TASKS = 40


def assert_unavailable_within_deadline(address: str) -> None:
    """A call while PostgreSQL is down gets UNAVAILABLE well within its deadline."""
    channel = grpc.insecure_channel(address)
    try:
        stub = pb_grpc.TaskServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetTask(pb.GetTaskRequest(task_id=str(uuid.uuid4())), timeout=8)
        elapsed = time.monotonic() - started
    finally:
        channel.close()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value
    assert elapsed < 7, f"UNAVAILABLE took {elapsed:.1f}s"


def producer(cluster, client, stop: threading.Event, errors: list[BaseException]) -> None:
    """Enqueue a task every 100 ms until stopped; the cluster remembers what was acked."""
    while not stop.is_set():
        try:
            cluster.enqueue_one(client, Task(type="sleep", payload=b"0.2"))
        except Exception as exc:  # recorded: the test expects none (clients retry for 60 s)
            errors.append(exc)
        stop.wait(0.1)


@pytest.mark.slow
def test_postgres_immediate_stop_under_load(cluster, pg_cluster):
    """Crash PostgreSQL (pg_ctl stop -m immediate) with tasks running, queued and arriving.

    /readyz answers 503 while it is down and 200 again once it is back; every task
    acknowledged before, during (a producer keeps enqueueing and retrying) and after the
    outage completes.
    """
    if pg_cluster.embedded is None:
        pytest.skip("stopping PostgreSQL needs the embedded cluster")
    server = cluster.server()
    workers = [cluster.worker(server, concurrency=4) for _ in range(2)]
    cluster.wait_registered(*workers)
    client = cluster.client(server)
    before = cluster.enqueue(client, [Task(type="sleep", payload=b"0.5") for _ in range(TASKS)])
    wait_for(
        lambda: len(cluster.ledger.finished()) >= 8,
        timeout=20,
        what="the load to get going",
    )
    stop = threading.Event()
    errors: list[BaseException] = []
    feeder = threading.Thread(
        target=producer, args=(cluster, cluster.client(server), stop, errors), daemon=True
    )
    feeder.start()
    try:
        running = cluster.db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state='running'")
        assert running > 0, "nothing was running when PostgreSQL stopped"
        down_at = time.monotonic()
        pg_cluster.embedded.stop(mode="immediate")
        try:
            wait_for(
                lambda: server.get("/readyz")[0] == 503,
                timeout=15,
                interval=0.05,
                what="/readyz to fail",
            )
            assert server.get("/healthz")[0] == 200  # alive, just not ready
            assert_unavailable_within_deadline(server.address)
            # The fault itself: PostgreSQL stays down for a while.
            time.sleep(max(0.0, down_at + OUTAGE - time.monotonic()))
        finally:
            pg_cluster.embedded.start()
        back_at = time.monotonic()
        wait_for(lambda: server.get("/readyz")[0] == 200, timeout=30, what="/readyz to recover")
        cluster.record_recovery(time.monotonic() - back_at)
        # New work flows again before the producer stops.
        after = cluster.enqueue_one(client, Task(type="noop", payload=b"after"))
        assert wait_final(client, after, timeout=30).state is TaskState.SUCCEEDED
    finally:
        stop.set()
        feeder.join(90)
    assert not feeder.is_alive()
    assert errors == [], f"the producer's enqueues failed: {errors[:3]}"
    cluster.notes.append(f"{len(cluster.acked) - TASKS - 1} enqueued by the producer")

    finals = [wait_final(client, task_id, timeout=60) for task_id in before]
    assert {s.state for s in finals} == {TaskState.SUCCEEDED}
    assert server.running()


@pytest.mark.slow
def test_terminate_every_server_backend(cluster):
    """pg_terminate_backend on every server connection: the pool and LISTEN reconnect.

    A task enqueued afterwards starts within 2 s (the LISTEN connection is back, or the
    long poll's own polling finds it) and completes.
    """
    server = cluster.server()
    worker = cluster.worker(server, concurrency=2)
    cluster.wait_registered(worker)
    client = cluster.client(server)
    warmup = cluster.enqueue_one(client, Task(type="noop"))
    assert wait_final(client, warmup, timeout=10).state is TaskState.SUCCEEDED
    wait_for(
        lambda: (server.status() or {}).get("listening_for_notifications"),
        timeout=10,
        what="the server to listen",
    )

    backends = "application_name LIKE 'conveyor-server%' AND datname = current_database()"
    terminated = {
        row["pid"]
        for row in cluster.db.fetch(
            f"SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE {backends}"  # noqa: S608 - constant text
        )
    }
    cut_at = time.monotonic()
    assert len(terminated) >= 3, terminated  # main pool, priority pool, LISTEN

    def reconnected() -> bool:
        """A new LISTEN connection (its last statement is a LISTEN) and a new pool one."""
        status = server.status() or {}
        rows = cluster.db.fetch(f"SELECT pid, query FROM pg_stat_activity WHERE {backends}")  # noqa: S608
        new = [row for row in rows if row["pid"] not in terminated]
        listening = [row for row in new if row["query"].upper().startswith("LISTEN")]
        return bool(status.get("listening_for_notifications") and listening and len(new) > 1)

    wait_for(reconnected, timeout=15, interval=0.05, what="the server to reconnect")
    cluster.record_recovery(time.monotonic() - cut_at)

    task_id = cluster.enqueue_one(client, Task(type="noop", payload=b"prompt"))
    acked_at = time.time()
    run = cluster.wait_starts(task_id, timeout=10)[0]
    delay = float(run["at"]) - acked_at
    assert delay < 2.0, f"the task started {delay:.2f}s after it was enqueued"
    status = wait_final(client, task_id, timeout=10)
    assert status.state is TaskState.SUCCEEDED
    assert status.result == b"prompt"
    assert [e.event for e in status.history] == ["enqueued", "started", "succeeded"]
    assert worker.process.poll() is None


@pytest.mark.slow
def test_an_outage_longer_than_worker_lost_after_costs_no_attempt(cluster, pg_cluster):
    """PostgreSQL down for longer than `--worker-lost-after` (12 s against 8: above the 5 s a
    worker's breaker waits before it calls a failing server again, and a heartbeat
    interval, as the defaults are), shorter than a lease (30 s), with tasks running that
    finish during the outage.

    No heartbeat lands while the database is down, and the first sweep after it used to
    mark every worker lost ("missed its heartbeats for 8s; marked lost, N lease(s)
    released"): the finished outcomes were refused and every task ran a second time (found
    by an operator's walkthrough with an 18.6 s stop). Silence now counts only while the
    leader reaches the database: every task runs once, on its first attempt.
    """
    if pg_cluster.embedded is None:
        pytest.skip("stopping PostgreSQL needs the embedded cluster")
    server = cluster.server(
        "--lease-ttl", "30", "--worker-lost-after", "8", "--heartbeat-interval", "0.5"
    )
    worker = cluster.worker(server, concurrency=8)
    cluster.wait_registered(worker)
    client = cluster.client(server)
    task_ids = cluster.enqueue(client, [Task(type="sleep", payload=b"2") for _ in range(8)])
    wait_for(
        lambda: len(cluster.ledger.started()) == len(task_ids),
        timeout=20,
        what="every task to start",
    )
    down_at = time.monotonic()
    pg_cluster.embedded.stop(mode="fast")
    try:
        wait_for(
            lambda: len(cluster.ledger.finished()) == len(task_ids),
            timeout=15,
            what="the handlers to finish while PostgreSQL is down",
        )
        # The fault itself: PostgreSQL stays down past the silence that marks a worker lost.
        time.sleep(max(0.0, down_at + 12.0 - time.monotonic()))
    finally:
        pg_cluster.embedded.start()
    finals = [wait_final(client, task_id, timeout=60) for task_id in task_ids]

    assert [(f.state, f.attempts) for f in finals] == [(TaskState.SUCCEEDED, 1)] * len(task_ids)
    assert len(cluster.ledger.started()) == len(task_ids), "a task ran twice"
    events = {event.event for final in finals for event in final.history}
    assert "lease_expired" not in events
    assert cluster.db.fetchval("SELECT count(*) FROM conveyor_workers WHERE state = 'lost'") == 0
