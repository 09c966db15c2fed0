"""A sync handler that returned just before the drain stopped it is reported, not handed back.

A sync handler runs on a thread; the worker's event loop waits on a copy of the thread's
future (`asyncio.wrap_future`), which hears of the handler's end only when the loop runs a
callback the thread scheduled. A drain that stopped the attempt in between cancelled that
copy, and the worker handed back the task of a handler that had returned: the success was
lost and the task ran again. A stop now leaves the copy of a returned thread alone, and the
handler's own outcome is reported.

The window (from the thread's end to the loop's callback) is microseconds on an idle loop
and as long as the loop lags under load. The test opens it without sleeping: on the
`task_released` line that the drain logs just before it stops the attempt (in the same
step of the loop), a logging handler lets the handler return and waits, with a deadline,
until its thread has ended, holding the loop as lag would.
"""

from __future__ import annotations

import logging
import threading

from helpers import wait_for

from conveyor import Client, Task, Worker


class ReturnBeforeTheStop(logging.Handler):
    """On the drain's `task_released` line: let the handler return, wait until it has."""

    def __init__(self, release: threading.Event, worker: Worker) -> None:
        super().__init__(level=logging.INFO)
        self.let_go = release
        self.worker = worker
        self.returned_first = False

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) != "task_released":
            return
        self.let_go.set()
        # On the worker's loop: the loop runs the thread's callback only after this returns.
        try:
            wait_for(lambda: self.worker.busy_threads() == 0, timeout=10, what="the thread's end")
        except BaseException:  # pytest's Failed: never raise into the worker's loop
            return
        self.returned_first = True


def test_a_sync_handler_that_returned_is_not_handed_back_at_the_drain(
    server, client: Client, db
) -> None:
    started = threading.Event()
    release = threading.Event()
    runs: list[int] = []

    def returns_once_released(ctx, _payload):
        runs.append(ctx.attempt)
        started.set()
        release.wait(30)  # deaf to ctx.cancelled on purpose: it is about to return anyway
        return b"done"

    worker = Worker(server.address, concurrency=1, drain_timeout=0.2)
    worker.register_handler("drain.race", returns_once_released)
    hook = ReturnBeforeTheStop(release, worker)
    logger = logging.getLogger("conveyor.worker")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(hook)
    try:
        worker.start()
        try:
            task_id = client.enqueue_task(Task(type="drain.race", max_retries=0))
            wait_for(started.is_set, timeout=10, what="the handler to start")
        finally:
            worker.stop()
    finally:
        logger.removeHandler(hook)
        logger.setLevel(level)

    assert hook.returned_first, "the handler did not return between the drain and the stop"
    row = db.task(task_id)
    events = [event["event"] for event in db.events(task_id)]
    assert runs == [1]
    assert row["state"] == "succeeded", (row["state"], events)
    assert row["result"] == b"done"
    assert events == ["enqueued", "started", "succeeded"]
