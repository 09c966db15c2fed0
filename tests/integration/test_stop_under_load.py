"""Stop signals while a worker process is busy with many short tasks.

operations.md, "Stop gracefully": SIGTERM a worker: it stops leasing, lets running tasks
finish for its drain timeout, hands the rest back without spending their attempts, and
exits 0. So after the process exits no task may be left `running` under its leases, to come
back `lease_expired` 30 s later with an attempt spent: over the Work stream, and over long
polls (a server without the stream), where the worker used to cancel the poll in flight
and lose the reply on its way.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest
from helpers import conveyor_command, rpc_count, wait_for

from conveyor import Client, Task, Worker

TASKS = 4_000
CYCLES = 2
LONG = "conveyor_long_rpc_duration_seconds"  # long polls are timed apart


def active_workers(db) -> int:
    return db.fetchval("SELECT count(*) FROM conveyor_workers WHERE state = 'active'")


def spawn(processes, address: str, ledger, name: str):
    return processes(
        conveyor_command(
            "worker", "worker_apps:worker", "--server", address, "--concurrency", "32"
        ),
        name=name,
        CONVEYOR_TEST_LEDGER=str(ledger.path),
    )


def stop_under_load(server, client, db, ledger, processes, kind: str, sig: int, name: str):
    """Run a worker through a backlog and signal it mid-flow; the tasks it left running."""
    worker = spawn(processes, server.address, ledger, name)
    wait_for(lambda: active_workers(db) == 1, timeout=30, what="the worker to register")
    before = len(ledger.started())
    for _ in range(TASKS // 500):
        client.enqueue_tasks([Task(type=kind, payload=b"x") for _ in range(500)])
    wait_for(lambda: len(ledger.started()) >= before + TASKS // 4, timeout=60, what="work to flow")
    signalled = time.monotonic()
    worker.signal(sig)
    code = worker.wait(90)
    took = time.monotonic() - signalled
    assert code == 0, worker.output()
    assert took < 30 + 30, took
    left = db.fetch("SELECT id FROM conveyor_tasks WHERE state = 'running'")
    return [str(row["id"]) for row in left]


def finish_and_count(server, db, ledger, processes) -> Counter:
    finisher = spawn(processes, server.address, ledger, "finisher")
    total = db.fetchval("SELECT count(*) FROM conveyor_tasks")
    wait_for(
        lambda: (
            db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'succeeded'") == total
        ),
        timeout=120,
        what="every task to succeed",
    )
    finisher.signal(signal.SIGTERM)
    assert finisher.wait(60) == 0
    return Counter(row["event"] for row in db.fetch("SELECT event FROM conveyor_task_history"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stop_under_load_on_long_polls_hands_back_every_lease(
    start_server, db, ledger, processes
):
    """On a server without the Work stream (`--no-work-stream`, or an older server) the
    worker leases by LeaseTasks long polls. At the stop it cancelled the poll in flight: a
    poll whose claim had committed and whose reply was on its way was lost, and its leases
    sat `running` until they expired (an attempt spent, `lease_expired` blaming the
    worker), in about one stop of two or three under load (13 to 63 tasks in 6 stops)."""
    server = start_server(work_stream=False)
    with Client(server.address) as client:
        for cycle in range(2 * CYCLES):
            kind = "noop" if cycle % 2 else "async_noop"
            left = stop_under_load(
                server, client, db, ledger, processes, kind, signal.SIGTERM, f"w{cycle}"
            )
            assert not left
        events = finish_and_count(server, db, ledger, processes)
    expired = db.fetch(
        "SELECT task_id, detail FROM conveyor_task_history WHERE event = 'lease_expired'"
    )
    assert events["lease_expired"] == 0, (
        f"{len(expired)} leases of gracefully stopped workers expired, each an attempt "
        f"spent (first: {dict(expired[0]) if expired else None}); events: {dict(events)}"
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_under_load_on_the_work_stream_hands_back_every_lease(
    sig, server, client, db, ledger, processes
):
    """The same over the Work stream (its half-close hands back leases in flight), by
    each stop signal; and no task ran twice (ledger)."""
    for cycle in range(CYCLES):
        left = stop_under_load(
            server,
            client,
            db,
            ledger,
            processes,
            "noop" if cycle % 2 else "async_noop",
            sig,
            f"w{cycle}",
        )
        assert not left
    events = finish_and_count(server, db, ledger, processes)
    assert events["lease_expired"] == 0, events
    assert events["timed_out"] == 0, events
    assert events["succeeded"] == TASKS * CYCLES, events
    starts = Counter(row["task_id"] for row in ledger.started())
    assert not {task for task, n in starts.items() if n > 1}


def test_an_idle_long_poll_is_ended_by_its_server_at_the_stop(start_server, db) -> None:
    """A worker stopping with a long poll waiting for work: its draining heartbeat makes
    the server answer the poll at once, empty (OK), rather than the worker cancelling it
    after waiting (CANCELLED), which is where a reply on its way used to be lost."""
    server = start_server(work_stream=False)
    worker = Worker(server.address, concurrency=2, lease_wait=20)
    worker.register_handler("idle.poll", lambda _ctx, payload: payload)
    worker.start()
    try:
        wait_for(
            lambda: worker.worker_id in server.server.worker_service._waiting_polls,
            what="the worker's poll to wait in the server",
        )
        answered = rpc_count(server.http_url, "LeaseTasks", "OK", LONG)
    finally:
        worker.stop()
    assert rpc_count(server.http_url, "LeaseTasks", "OK", LONG) == answered + 1
    assert rpc_count(server.http_url, "LeaseTasks", "CANCELLED", LONG) == 0
    assert not server.server.worker_service._waiting_polls
