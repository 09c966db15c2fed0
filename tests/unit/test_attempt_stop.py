"""What stopping an attempt does to its handler's future (worker/runtime.py `_Attempt.stop`).

A sync handler's end reaches the worker's loop a callback after its thread returns (the
loop waits on `asyncio.wrap_future`'s copy of the thread's future). A stop that came in
between cancelled the copy, and the worker reported the stop (a hand-back at the drain, a
timeout) for a handler that had returned: its task ran again. The integration test
test_sync_handler_at_the_drain.py opens the window on a real worker; these pin the rule.
"""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import Future
from datetime import UTC, datetime

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.worker.context import TaskContext
from conveyor.worker.runtime import _Attempt


def attempt_of(thread: Future[bytes] | None, handler: asyncio.Future[bytes]) -> _Attempt:
    ctx = TaskContext(
        task_id="t",
        task_type="x",
        attempt=1,
        max_retries=0,
        lease_id="l",
        deadline=datetime.now(UTC),
    )
    return _Attempt(lease=pb.Lease(), ctx=ctx, handler_future=handler, thread_future=thread)


async def test_a_stop_leaves_the_outcome_of_a_returned_thread_to_arrive() -> None:
    thread: Future[bytes] = Future()
    copy = asyncio.wrap_future(thread)
    thread.set_result(b"done")  # the thread has returned; the loop has not heard yet
    assert not copy.done()
    attempt = attempt_of(thread, copy)

    attempt.stop("shutdown")

    assert attempt.ended_before_stop
    assert attempt.ctx.cancelled.is_set()
    assert await asyncio.wait_for(copy, timeout=10) == b"done"


async def test_a_stop_cancels_a_sync_handler_still_running() -> None:
    thread: Future[bytes] = Future()
    copy = asyncio.wrap_future(thread)
    attempt = attempt_of(thread, copy)

    attempt.stop("timeout")
    thread.set_result(b"late")  # returns because it was told to stop

    assert not attempt.ended_before_stop
    assert copy.cancelled()


async def test_an_async_handler_is_cancelled_and_never_counts_as_ended_first() -> None:
    handler: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    attempt = attempt_of(None, handler)

    attempt.stop("shutdown")

    assert not attempt.ended_before_stop
    assert handler.cancelled()


async def test_only_the_first_stop_decides() -> None:
    thread: Future[bytes] = Future()
    copy = asyncio.wrap_future(thread)
    attempt = attempt_of(thread, copy)
    attempt.stop("shutdown")
    thread.set_result(b"late")

    attempt.stop("lease_lost")

    assert (attempt.stop_reason, attempt.ended_before_stop) == ("shutdown", False)
    assert copy.cancelled()


async def test_the_unreported_error_of_a_returned_thread_is_not_logged_as_never_retrieved(
    caplog,
) -> None:
    thread: Future[bytes] = Future()
    copy = asyncio.wrap_future(thread)
    thread.set_exception(RuntimeError("raised before the stop"))
    attempt = attempt_of(thread, copy)

    attempt.stop("lease_lost")  # the worker reports nothing for this attempt
    await asyncio.wait({copy}, timeout=10)
    del attempt, copy, thread
    gc.collect()

    assert "never retrieved" not in caplog.text


async def test_the_error_an_async_handler_ends_with_after_its_stop_is_read(caplog) -> None:
    """Its cleanup raised on the cancellation, and nothing reports a cancelled attempt:
    asyncio logged "Task exception was never retrieved" (found by a review)."""

    async def cleanup_fails_on_cancel() -> bytes:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup after the cancellation failed") from None
        return b"never"

    handler = asyncio.ensure_future(cleanup_fails_on_cancel())
    await asyncio.sleep(0)  # let it start waiting
    attempt = attempt_of(None, handler)

    attempt.stop("cancelled")
    await asyncio.wait({handler}, timeout=10)
    del attempt, handler
    gc.collect()

    assert "never retrieved" not in caplog.text


async def test_an_async_handler_that_ended_before_the_stop_counts_as_ended_first() -> None:
    """As a sync one does: its own outcome is reported (a failure is not handed back)."""
    handler: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    handler.set_exception(RuntimeError("failed before the drain"))
    attempt = attempt_of(None, handler)

    attempt.stop("shutdown")

    assert attempt.ended_before_stop
    assert isinstance(handler.exception(), RuntimeError)
