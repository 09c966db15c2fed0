"""Durability across restarts of the server process and of PostgreSQL itself.

Needs the embedded PostgreSQL (the tests restart it); skipped with an external one.
"""

from __future__ import annotations

import signal

import pytest
from helpers import wait_final

from conveyor import Client, Task, TaskState


def require_embedded(pg_cluster) -> None:
    if pg_cluster.embedded is None:
        pytest.skip("restarting PostgreSQL needs the embedded cluster")


def history_of(status) -> list[tuple]:
    return [
        (event.at, event.event, event.state, event.attempt, event.worker_id, event.detail)
        for event in status.history
    ]


def stop_worker(worker) -> None:
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()


@pytest.mark.slow
class TestPersistence:
    def test_tasks_and_history_survive_server_and_postgres_restarts(
        self, pg_cluster, server_process, spawn_worker, ledger, db
    ):
        """Finished tasks keep their history; queued tasks wait through both restarts."""
        require_embedded(pg_cluster)
        server = server_process()
        with Client(server.address) as client:
            first_worker = spawn_worker(server.address, concurrency=2, name="worker-before")
            task_a = client.enqueue_task(Task(type="noop", payload=b"A"))
            before = wait_final(client, task_a)
            assert before.state is TaskState.SUCCEEDED
            assert [e.event for e in before.history] == ["enqueued", "started", "succeeded"]
            stop_worker(first_worker)

            queued = [
                client.enqueue_task(Task(type="noop", payload=str(i).encode())) for i in range(5)
            ]
            assert [client.get_task_status(i).state for i in queued] == [TaskState.QUEUED] * 5

            old_pid = server.pid
            assert server.stop(signal.SIGTERM) == 0, server.process.output()
            pg_cluster.restart()
            server.start()
            assert server.pid != old_pid

            # Still queued after both restarts: nothing was lost, nothing ran.
            assert [client.get_task_status(i).state for i in queued] == [TaskState.QUEUED] * 5
            second_worker = spawn_worker(server.address, concurrency=2, name="worker-after")
            finals = [wait_final(client, task_id) for task_id in queued]
            after = client.get_task_status(task_a, history=True)

        assert [s.state for s in finals] == [TaskState.SUCCEEDED] * 5
        assert [s.result for s in finals] == [str(i).encode() for i in range(5)]
        assert after.state is TaskState.SUCCEEDED
        assert after.result == b"A"
        assert after.finished_at == before.finished_at
        assert history_of(after) == history_of(before)

        # Each task ran exactly once, and the queued ones on the worker started afterwards.
        runs = {row["task_id"]: row["pid"] for row in ledger.started()}
        assert len(ledger.started()) == 6
        assert runs[task_a] == str(first_worker.pid)
        assert {runs[i] for i in queued} == {str(second_worker.pid)}
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == 6

    def test_connected_worker_carries_on_through_server_and_postgres_restarts(
        self, pg_cluster, server_process, spawn_worker, ledger, db
    ):
        """A worker process left running reconnects by itself after both restarts."""
        require_embedded(pg_cluster)
        server = server_process()
        worker = spawn_worker(server.address, concurrency=2, name="long-lived-worker")
        with Client(server.address) as client:
            warmup = client.enqueue_task(Task(type="noop"))
            assert wait_final(client, warmup).state is TaskState.SUCCEEDED

            assert server.stop(signal.SIGTERM) == 0, server.process.output()
            server.start()
            after_server_restart = client.enqueue_task(Task(type="noop", payload=b"1"))
            assert wait_final(client, after_server_restart).state is TaskState.SUCCEEDED

            pg_cluster.restart()
            server.wait_ready()
            assert server.running()
            later = client.enqueue_tasks(
                [Task(type="noop", payload=str(i).encode()) for i in range(5)]
            )
            finals = [wait_final(client, task_id) for task_id in later]

        assert [s.state for s in finals] == [TaskState.SUCCEEDED] * 5
        # The same worker process did everything, without being restarted.
        assert worker.process.poll() is None, worker.output()
        started = ledger.started()
        assert len(started) == 7
        assert {row["pid"] for row in started} == {str(worker.pid)}
        worker_ids = {s.worker_id for s in finals}
        assert len(worker_ids) == 1
        registered = db.fetch("SELECT id, pid FROM conveyor_workers")
        assert [(row["id"], row["pid"]) for row in registered] == [(worker_ids.pop(), worker.pid)]
        assert server.ready()
