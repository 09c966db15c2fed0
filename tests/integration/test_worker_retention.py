"""Worker retention: the leader deletes workers that stopped or were lost long enough ago.

Every worker process registers under a fresh id, so without it conveyor_workers (and
`conveyor workers`, and conveyor_workers{state="lost"}) grew with every worker that ever
ran. Real server and workers: workers are made old by moving their last heartbeat back in
the database, and the leader must delete exactly the stopped and lost ones past the bound,
in bounded batches, fenced by its term, while the tasks they ran stay readable.
"""

from __future__ import annotations

import urllib.request
from datetime import timedelta
from typing import Any

import asyncpg
from helpers import metric_samples, running, wait_final, wait_for, worker_stub

from conveyor import Client, Task, TaskState, Worker
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.storage import queries

TYPE = "workers.job"


def pruned(http_url: str) -> dict[str, float]:
    """conveyor_workers_pruned_total by state."""
    return {
        sample.labels["state"]: sample.value
        for sample in metric_samples(http_url)
        if sample.name == "conveyor_workers_pruned_total"
    }


def test_the_leader_deletes_workers_gone_longer_than_the_retention(start_server, db) -> None:
    """Of five workers, a stopped one and a lost one last heard from two hours ago are
    deleted (retention: one hour); one stopped a moment ago, one lost ten minutes ago and a
    live one are kept. The task the deleted worker ran keeps its history, its explanation
    and its dashboard page, which name the worker by id."""
    server = start_server(
        worker_retention=timedelta(hours=1), retention_interval=timedelta(milliseconds=200)
    )

    def worker(worker_id: str) -> Worker:
        made = Worker(server.address, worker_id=worker_id, concurrency=1)
        made.register_handler(TYPE, lambda _ctx, payload: payload)
        return made

    def workers() -> dict[str, str]:
        return {
            row["id"]: row["state"] for row in db.fetch("SELECT id, state FROM conveyor_workers")
        }

    with Client(server.address) as client:
        with running(worker("w-stopped-old")):
            task_id = client.enqueue_task(Task(type=TYPE, payload=b"x"))
            assert wait_final(client, task_id).state is TaskState.SUCCEEDED
        with running(worker("w-stopped-recent")):
            pass
        with running(worker("w-active")), worker_stub(server.address) as stub:
            for worker_id in ("w-lost-old", "w-lost-recent"):
                # Registered, then never heard from again.
                stub.RegisterWorker(
                    pb.RegisterWorkerRequest(
                        worker_id=worker_id, host="h", pid=1, task_types=[TYPE], concurrency=1
                    ),
                    timeout=10,
                )
            assert workers() == {
                "w-stopped-old": "stopped",
                "w-stopped-recent": "stopped",
                "w-active": "active",
                "w-lost-old": "active",
                "w-lost-recent": "active",
            }
            db.execute(
                "UPDATE conveyor_workers SET last_heartbeat_at = now() - CASE id "
                "WHEN 'w-lost-recent' THEN interval '10 minutes' ELSE interval '2 hours' END "
                "WHERE id IN ('w-stopped-old', 'w-lost-old', 'w-lost-recent')"
            )
            # The sweeper marks both silent workers lost in one statement; the pruner then
            # deletes the old one only.
            wait_for(
                lambda: (
                    workers()
                    == {
                        "w-stopped-recent": "stopped",
                        "w-active": "active",
                        "w-lost-recent": "lost",
                    }
                ),
                what="the stopped and lost workers gone for two hours to be deleted",
            )
            listed = {info.id for info in client.list_workers(include_stopped=True)}
            assert listed == {"w-stopped-recent", "w-active", "w-lost-recent"}

            # The task the deleted worker ran reads as before.
            status = client.get_task_status(task_id, history=True)
            assert status.state is TaskState.SUCCEEDED
            assert [(e.event, e.worker_id) for e in status.history] == [
                ("enqueued", None),
                ("started", "w-stopped-old"),
                ("succeeded", "w-stopped-old"),
            ]
            assert client.explain_task(task_id)[0].startswith("succeeded after 1 attempt(s)")
            url = f"{server.http_url}/ui/tasks/{task_id}"
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
                assert response.status == 200
                assert "w-stopped-old" in response.read().decode()

    assert pruned(server.http_url) == {"stopped": 1.0, "lost": 1.0}


def test_worker_retention_is_a_day_by_default_and_can_be_turned_off(start_server) -> None:
    default = start_server()
    assert default.server.config.worker_retention == timedelta(hours=24)
    assert [s.name for s in default.server.maintenance].count("worker-retention") == 1
    kept = start_server(worker_retention=None)
    assert "worker-retention" not in [s.name for s in kept.server.maintenance]


async def test_the_prune_is_fenced_and_works_in_bounded_batches_oldest_first(
    database_url: str,
) -> None:
    """1,500 workers stopped two days ago, beside an active one just as silent (the
    sweeper's to judge, never deleted as such) and one lost a minute ago. A proof of a
    stale term or another holder deletes nothing; the current one deletes at most a batch
    per statement, longest silent first."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO conveyor_workers (id, host, pid, task_types, concurrency, version, "
            "state, last_heartbeat_at) "
            "SELECT 'old-' || g, 'h', g, '{t}'::text[], 1, 'v', 'stopped', "
            "       now() - interval '2 days' - g * interval '1 second' "
            "FROM generate_series(1, 1500) AS g "
            "UNION ALL SELECT 'silent-active', 'h', 1, '{t}', 1, 'v', 'active', "
            "                 now() - interval '3 days' "
            "UNION ALL SELECT 'lost-recently', 'h', 1, '{t}', 1, 'v', 'lost', "
            "                 now() - interval '1 minute'"
        )
        elected = await queries.leader_attempt_elect(
            conn, name="maintenance", holder="prune-test", ttl=timedelta(minutes=1), term=None
        )
        assert elected is not None
        term = int(elected["term"])

        async def prune(proof: queries.LeaderProof) -> dict[str, int]:
            return await queries.worker_prune_gone(
                conn, retention=timedelta(days=1), limit=1000, leader=proof
            )

        async def count() -> Any:
            return await conn.fetchval("SELECT count(*) FROM conveyor_workers")

        for stale in (
            queries.LeaderProof("prune-test", term - 1),
            queries.LeaderProof("prune-test", term + 1),
            queries.LeaderProof("someone-else", term),
        ):
            assert await prune(stale) == {}, stale
        assert await count() == 1502

        valid = queries.LeaderProof("prune-test", term)
        assert await prune(valid) == {"stopped": 1000}
        # The longest silent went first: what is left of them is the 500 most recent.
        left = await conn.fetch("SELECT id FROM conveyor_workers WHERE id LIKE 'old-%'")
        assert {row["id"] for row in left} == {f"old-{g}" for g in range(1, 501)}
        assert await prune(valid) == {"stopped": 500}
        assert await prune(valid) == {}
        remaining = await conn.fetch("SELECT id FROM conveyor_workers ORDER BY id")
        assert [row["id"] for row in remaining] == ["lost-recently", "silent-active"]
    finally:
        await conn.close()


def test_a_worker_whose_row_was_deleted_registers_again(start_server, db) -> None:
    """A worker silent longer than the retention (a machine suspended for a day) comes back
    to find its row gone: its next heartbeat is told so, and it registers again."""
    server = start_server()
    worker = Worker(server.address, concurrency=1)
    worker.register_handler(TYPE, lambda _ctx, payload: payload)
    with running(worker):
        row = "SELECT state FROM conveyor_workers WHERE id = $1"
        wait_for(lambda: db.fetchval(row, worker.worker_id) == "active", what="registration")
        db.execute("DELETE FROM conveyor_workers WHERE id = $1", worker.worker_id)
        wait_for(
            lambda: db.fetchval(row, worker.worker_id) == "active",
            timeout=15,
            what="the worker to register again",
        )
        with Client(server.address) as client:
            task_id = client.enqueue_task(Task(type=TYPE, payload=b"still working"))
            assert wait_final(client, task_id).result == b"still working"
