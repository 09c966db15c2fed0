"""The happy path through every component in one process: client, server, worker, database."""

from __future__ import annotations

from helpers import wait_final

from conveyor import Client, Task, TaskState, Worker


class TestHappyPath:
    def test_enqueued_task_runs_and_its_result_is_stored(self, server, client: Client) -> None:
        """A task enqueued through the client is run by a worker and ends SUCCEEDED."""
        worker = Worker(server.address, concurrency=2)
        worker.register_handler("echo", lambda _ctx, payload: payload[::-1])
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="echo", payload=b"abc"))
            status = wait_final(client, task_id)
        finally:
            worker.stop()
        assert status.state is TaskState.SUCCEEDED
        assert status.result == b"cba"
        assert status.attempts == 1
        assert status.worker_id == worker.worker_id
        assert [event.event for event in status.history] == ["enqueued", "started", "succeeded"]
