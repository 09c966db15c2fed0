"""The demo worker that `conveyor dev` runs.

Three task types show the happy path, a slow cancellable task, and retries. Also runnable
as `conveyor worker conveyor.cli.demo_worker:worker`.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from conveyor.errors import PermanentFailure
from conveyor.worker.runtime import Worker

if TYPE_CHECKING:
    from conveyor.worker.context import TaskContext


def echo(ctx: TaskContext, payload: bytes) -> bytes:
    """Return the payload unchanged."""
    ctx.logger.info("echo %d bytes", len(payload))
    return payload


async def sleep(ctx: TaskContext, payload: bytes) -> bytes:
    """Sleep for the number of seconds in the payload (cancellable)."""
    try:
        seconds = float(payload or b"1")
    except ValueError:
        seconds = math.nan
    # nan failed on asyncio.sleep and was retried; -5 "slept"; inf slept to the timeout.
    if not (math.isfinite(seconds) and seconds >= 0):
        raise PermanentFailure("demo.sleep expects a number of seconds as its payload")
    await asyncio.sleep(seconds)
    return f"slept {seconds:g}s on attempt {ctx.attempt}".encode()


def fail(ctx: TaskContext, payload: bytes) -> bytes:
    """Always fail, to show retries with backoff and the final FAILED state."""
    message = payload.decode(errors="replace") or "demo failure"
    raise RuntimeError(f"{message} (attempt {ctx.attempt})")


def build_demo_worker(*, concurrency: int = 4) -> Worker:
    """A Worker with the demo handlers registered."""
    demo = Worker(concurrency=concurrency)
    demo.register_handler("demo.echo", echo)
    demo.register_handler("demo.sleep", sleep)
    demo.register_handler("demo.fail", fail)
    return demo


worker = build_demo_worker()
