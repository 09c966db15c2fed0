"""A row lock held by another session on one task costs no other task anything.

An operator's psql session (or any long transaction) holding `FOR UPDATE` on a running
task's row is a lock wait for every statement that touches that row. Two statements name
many tasks at once and waited for it with everyone else's rows: a worker's heartbeat
(`task_lease_extend`), whose other leases then expired and ran again, and the joined
success write (`task_succeed_many`), which held every success joined to it, and the group
commit's slots, until the lock went. Both now skip a locked row: a heartbeat leaves that
lease alone (`not_extended`), and a success is applied by itself, waiting for the lock on a
connection of its own.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

from helpers import holding, wait_final, wait_for

from conveyor import Client, Task, TaskContext, TaskState, Worker

LEASE = timedelta(seconds=4)
HANDLER_RUNS = 6.0  # both tasks are still running while the lock is held


def lock_rows(database_url: str, *task_ids: str):
    """Hold FOR UPDATE on these tasks' rows from another session, as an operator would."""
    ids = ", ".join(f"'{task_id}'" for task_id in task_ids)
    # The ids are the tests' own, made by the client.
    return holding(database_url, f"SELECT 1 FROM conveyor_tasks WHERE id IN ({ids}) FOR UPDATE")  # noqa: S608


def test_a_locked_row_holds_up_no_other_lease(start_server, database_url, db) -> None:
    server = start_server(lease_ttl=LEASE, heartbeat_interval=timedelta(seconds=0.5))
    starts: list[tuple[str, int]] = []
    lock = threading.Lock()

    async def slow(ctx: TaskContext, payload: bytes) -> bytes:
        with lock:
            starts.append((ctx.task_id, ctx.attempt))
        await asyncio.sleep(HANDLER_RUNS)
        return payload

    worker = Worker(server.address, concurrency=2)
    worker.register_handler("rowlock.slow", slow)
    worker.start()
    try:
        with Client(server.address) as client:
            locked = client.enqueue_task(Task(type="rowlock.slow", payload=b"locked"))
            healthy = client.enqueue_task(Task(type="rowlock.slow", payload=b"healthy"))
            wait_for(lambda: len(starts) == 2, timeout=15, what="both tasks to start")
            with lock_rows(database_url, locked):
                locked_at = db.fetchval("SELECT now()")
                # Renewed while the other row is locked: a beat after the lock was taken.
                # Before, every beat of this worker waited for that lock, and this lease
                # expired.
                wait_for(
                    lambda: (
                        db.task(healthy)["lease_expires_at"]
                        > locked_at + LEASE + timedelta(seconds=0.3)
                    ),
                    timeout=LEASE.total_seconds(),
                    what="the unlocked task's lease to be renewed",
                )
                row = db.task(locked)
                # Left alone, neither renewed nor taken as lost.
                assert row["state"] == "running"
                assert row["lease_expires_at"] < locked_at + LEASE + timedelta(seconds=0.3)
            statuses = [wait_final(client, task_id, timeout=30) for task_id in (locked, healthy)]
    finally:
        worker.stop()
    assert [status.state for status in statuses] == [TaskState.SUCCEEDED] * 2
    for task_id in (locked, healthy):
        assert [row["event"] for row in db.events(task_id)] == ["enqueued", "started", "succeeded"]
    assert sorted(starts) == sorted([(locked, 1), (healthy, 1)])


def test_a_lease_locked_for_longer_than_a_lease_is_stopped_by_its_worker(
    start_server, database_url, db
) -> None:
    server = start_server(lease_ttl=LEASE, heartbeat_interval=timedelta(seconds=0.5))
    runs: list[int] = []
    stopped = threading.Event()

    async def waits(ctx: TaskContext, payload: bytes) -> bytes:
        runs.append(ctx.attempt)
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                stopped.set()
                raise
        return payload

    worker = Worker(server.address, concurrency=1)
    worker.register_handler("rowlock.long", waits)
    worker.start()
    try:
        with Client(server.address) as client:
            task_id = client.enqueue_task(Task(type="rowlock.long"))
            wait_for(lambda: runs == [1], timeout=15, what="the task to start")
            with lock_rows(database_url, task_id):
                # Not renewed for a whole lease (the reaper cannot take it back either,
                # while it is locked): the worker stops the attempt as a silent one.
                assert stopped.wait(LEASE.total_seconds() * 3), "the attempt was not stopped"
            status = wait_final(client, task_id, timeout=40)
    finally:
        worker.stop()
    assert status.state is TaskState.SUCCEEDED
    assert runs == [1, 2]
    events = [row["event"] for row in db.events(task_id)]
    assert events == ["enqueued", "started", "lease_expired", "started", "succeeded"], events


def waiting_on_locks(db) -> int:
    """How many of the servers' statements wait for a lock now."""
    return db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND application_name LIKE 'conveyor-server%' AND datname = current_database()"
    )


def test_a_success_commits_while_other_reported_rows_are_locked(
    start_server, database_url, db
) -> None:
    server = start_server(heartbeat_interval=timedelta(seconds=0.5))
    gates = {name: threading.Event() for name in ("a1", "a2")}
    started: dict[str, str] = {}

    def held_until_its_gate(name: str):
        def handler(ctx: TaskContext, payload: bytes) -> bytes:
            started[name] = ctx.task_id
            gates[name].wait(60)
            return payload

        return handler

    workers = []
    for name in ("a1", "a2"):
        worker = Worker(server.address, concurrency=1)
        worker.register_handler(f"hostage.{name}", held_until_its_gate(name))
        workers.append(worker)
    quick = Worker(server.address, concurrency=1)
    quick.register_handler("hostage.quick", lambda _ctx, payload: payload)
    workers.append(quick)
    for worker in workers:
        worker.start()
    try:
        with Client(server.address) as client:
            a1 = client.enqueue_task(Task(type="hostage.a1"))
            a2 = client.enqueue_task(Task(type="hostage.a2"))
            wait_for(lambda: len(started) == 2, timeout=15, what="both held tasks to start")
            with lock_rows(database_url, a1, a2):
                # The two held tasks finish; their successes wait for the locked rows, each
                # in a statement of its own (before: both group commit slots).
                gates["a1"].set()
                wait_for(lambda: waiting_on_locks(db) >= 1, timeout=10, what="a1's report")
                gates["a2"].set()
                wait_for(lambda: waiting_on_locks(db) >= 2, timeout=10, what="a2's report")
                # A task nobody locked runs, and its success commits while the lock holds.
                b = client.enqueue_task(Task(type="hostage.quick", payload=b"b"))
                wait_for(
                    lambda: db.task(b)["state"] == "succeeded",
                    timeout=5,
                    what="the unlocked task's success to commit",
                )
                assert {db.task(a1)["state"], db.task(a2)["state"]} == {"running"}
            statuses = [wait_final(client, task_id, timeout=30) for task_id in (a1, a2)]
    finally:
        for gate in gates.values():
            gate.set()
        for worker in workers:
            worker.stop()
    assert [status.state for status in statuses] == [TaskState.SUCCEEDED] * 2
    for task_id in (a1, a2, b):
        assert [row["event"] for row in db.events(task_id)] == ["enqueued", "started", "succeeded"]
    counted = server.server.metrics.registry.get_sample_value(
        "conveyor_task_outcomes_total", {"type": "hostage.a1", "outcome": "succeeded"}
    )
    assert counted == 1  # applied alone, and counted there
