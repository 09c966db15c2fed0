"""A sync handler that raises StopIteration fails its attempt like any other exception.

`next(iter([]))` on an empty result is a common slip in a handler. The handler's thread
sets StopIteration on its concurrent future, and asyncio.wrap_future refuses to copy it
into the loop's future ("StopIteration interacts badly with generators and cannot be
raised into a Future"): the loop's future never completes. The attempt then waits for its
timeout, after which the runner waits for ever for that future, holding its slot: a
worker with concurrency=1 runs nothing again.

Found by a review: the sync call now wraps StopIteration as the async ones wrap SystemExit,
and a handler that ended as it was stopped is settled from its thread's own future.
"""

from __future__ import annotations

from helpers import running, wait_final

from conveyor import Client, Task, TaskState, Worker


def test_a_sync_handler_raising_stop_iteration_fails_and_frees_its_slot(
    server, client: Client
) -> None:
    worker = Worker(server.address, concurrency=1, drain_timeout=1)

    @worker.handler("empty")
    def empty(_ctx, _payload):
        return next(iter([]))

    @worker.handler("ok")
    def ok(_ctx, _payload):
        return b"fine"

    with running(worker):
        empty_id = client.enqueue_task(Task(type="empty", max_retries=0, timeout=3))
        failed = wait_final(client, empty_id, timeout=20)
        ok_id = client.enqueue_task(Task(type="ok", max_retries=0))
        done = wait_final(client, ok_id, timeout=20)

    assert failed.state is TaskState.FAILED
    assert failed.last_error.startswith("StopIteration"), failed.last_error
    assert done.state is TaskState.SUCCEEDED
