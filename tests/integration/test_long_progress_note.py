"""A progress note longer than a message does not silence the worker's heartbeats.

getting-started.md: "a long text is cut to 8,000 characters". The server cuts it, but the
worker sends the whole text in every heartbeat until one is answered: a note larger than
the server's message limit makes every heartbeat fail (RESOURCE_EXHAUSTED), the note is
never cleared, and after a lease of silence the worker stops every attempt it runs, the
quiet ones beside the noisy one too.

Found by a review: the worker now cuts a note (and an error message) to what the server
keeps before sending it (codec.kept_text).
"""

from __future__ import annotations

import threading

from helpers import running, wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker
from conveyor.server.config import MIN_MESSAGE_BYTES


def test_a_huge_progress_note_is_cut_and_heartbeats_go_on(server, client: Client) -> None:
    release = threading.Event()
    noted = threading.Event()
    worker = Worker(server.address, concurrency=2, drain_timeout=1)

    @worker.handler("noisy")
    def noisy(ctx, _payload):
        ctx.heartbeat("x" * (MIN_MESSAGE_BYTES + 1024 * 1024))
        noted.set()
        release.wait(30)
        return b"noisy done"

    try:
        with running(worker):
            task_id = client.enqueue_task(Task(type="noisy", max_retries=0))
            wait_for(noted.is_set, what="the handler to report its progress")
            status = wait_for(
                lambda: (s := client.get_task_status(task_id)).progress is not None and s,
                timeout=15,
                what="the progress note to be stored (cut)",
            )
            assert status.progress.startswith("xxxx")
            assert len(status.progress) <= 8100
            release.set()
            done = wait_final(client, task_id, timeout=15)
    finally:
        release.set()
    assert done.state is TaskState.SUCCEEDED
