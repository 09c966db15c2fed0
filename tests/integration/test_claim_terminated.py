"""The backend of a Work stream's claim is terminated while the claim waits on a lock.

Not covered elsewhere: the existing test terminates idle backends. Here the claim
statement is mid-flight (waiting on a table lock) when pg_terminate_backend ends it: the
stream must end UNAVAILABLE, the worker open another, and the task run exactly once, with
a clean history.
"""

from __future__ import annotations

import threading

from helpers import holding, wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker

WAITING_CLAIMS = (
    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
    "AND application_name LIKE 'conveyor-server%' AND datname = current_database() "
    "AND query ILIKE '%conveyor_tasks%'"
)


def test_a_claim_terminated_mid_statement_loses_and_repeats_nothing(
    server, database_url, db
) -> None:
    runs: list[str] = []
    lock = threading.Lock()

    def handler(ctx, payload: bytes) -> bytes:
        with lock:
            runs.append(ctx.task_id)
        return payload

    with Client(server.address) as client:
        task_id = client.enqueue_task(Task(type="claimkill.job", payload=b"x"))
        with holding(database_url, "LOCK TABLE conveyor_tasks IN EXCLUSIVE MODE"):
            worker = Worker(server.address, concurrency=2)
            worker.register_handler("claimkill.job", handler)
            worker.start()
            try:
                pids = wait_for(
                    lambda: [row["pid"] for row in db.fetch(WAITING_CLAIMS)],
                    timeout=15,
                    what="the worker's claim to wait on the lock",
                )
                for pid in pids:
                    db.execute("SELECT pg_terminate_backend($1)", pid)
                wait_for(
                    lambda: not set(pids) & {row["pid"] for row in db.fetch(WAITING_CLAIMS)},
                    timeout=10,
                    what="the terminated claims to be gone",
                )
            except BaseException:
                worker.stop()
                raise
        try:
            status = wait_final(client, task_id, timeout=30)
            # The worker still takes new work afterwards.
            later = client.enqueue_task(Task(type="claimkill.job", payload=b"y"))
            assert wait_final(client, later, timeout=30).state is TaskState.SUCCEEDED
        finally:
            worker.stop()
    assert status.state is TaskState.SUCCEEDED
    assert [e.event for e in status.history] == ["enqueued", "started", "succeeded"]
    assert runs.count(task_id) == 1
