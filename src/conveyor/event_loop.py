"""The event loop the server and the workers run on: uvloop where it is installed.

uvloop is a dependency on every platform it supports (not Windows). Measured on the
benchmarks' 2-core machine in issue #5's sixth round, it took 7-10 % off the server's and
the workers' CPU per task, in the drain (W1) and at 200 tasks/s (W2) alike, once leases and
outcomes travelled as stream messages whose cost is mostly waking the loop.
`CONVEYOR_EVENT_LOOP=asyncio` keeps the standard loop (to compare, or to rule uvloop out).

A worker's loop also runs its users' async handlers, and `asyncio.run` waits without end
for a task that swallows its cancellation when the loop closes: `run(main, close_within=N)`
gives the tasks left at the end N seconds to finish after their cancellation, then closes
the loop without them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

Result = TypeVar("Result")

log = logging.getLogger("conveyor.event_loop")

# Tasks left behind when their loop closed (they ignored their cancellation), referenced
# while they are pending so that they are never destroyed half-way: their coroutines would
# be closed by the garbage collector at any moment, in any thread, running the user's
# `finally` blocks there. One that ends while the loop finishes closing (its async
# generators) is dropped then; it used to be kept for the life of the process too. One still
# pending once the loop is closed can never run again, and is kept.
_ABANDONED: set[asyncio.Task[Any]] = set()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory to run on: uvloop's, or None for asyncio's own loop."""
    if os.environ.get("CONVEYOR_EVENT_LOOP", "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional: absent on Windows
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, Result], *, close_within: float | None = None) -> Result:
    """`asyncio.run(main)` on the loop `loop_factory` picks.

    `close_within`: how long the tasks still running when `main` ends get to finish after
    their cancellation before the loop closes without them (None: as long as they take).
    """
    if close_within is None:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(main)
    factory = loop_factory()
    loop = factory() if factory is not None else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_remaining(loop, close_within)
            shutting = loop.create_task(loop.shutdown_asyncgens())
            loop.run_until_complete(asyncio.wait({shutting}, timeout=close_within))
            _abandon_pending({shutting})
        finally:
            # Shuts the default executor down without waiting for its threads (a blocking
            # call a handler ran in it may never return).
            loop.close()


def _cancel_remaining(loop: asyncio.AbstractEventLoop, within: float) -> None:
    remaining = asyncio.all_tasks(loop)
    if not remaining:
        return
    for task in remaining:
        task.cancel()
    loop.run_until_complete(asyncio.wait(remaining, timeout=within))
    for task in remaining:
        if task.done() and not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception while the event loop closed",
                    "exception": task.exception(),
                    "task": task,
                }
            )
    _abandon_pending(remaining)


def _abandon_pending(tasks: set[asyncio.Task[Any]]) -> None:
    pending = [task for task in tasks if not task.done()]
    if not pending:
        return
    log.warning(
        "closing the event loop without %d task(s) that ignored their cancellation: %s",
        len(pending),
        ", ".join(sorted(task.get_name() for task in pending)),
        extra={"event": "loop_closed_with_tasks"},
    )
    for task in pending:
        _ABANDONED.add(task)
        task.add_done_callback(_ABANDONED.discard)
