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

grpc.aio serves every event loop of a process from one completion queue: a batch (a read,
a status, a unary call) started on a loop reports to that loop, through whichever bound
loop reads the queue, even after its task was cancelled. A loop closed while grpc still
owes it such a completion makes the loop that receives it raise `RuntimeError: Event loop
is closed` (logged with its traceback), and stop handling the rest of the queue until the
next completion wakes it: in `conveyor dev`, the server's loop, after the demo worker's
loop closed on a crash. So `run(main, close_within=N)` also waits, N seconds at most,
until grpc has handed the loop every completion it owes it; what was cut (a call cancelled
by the tasks' cancellation, or a channel closed) ends within milliseconds. Closing the
channels is not enough: a channel's close cancels its calls and returns, and the
cancellations complete afterwards.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Final, TypeVar

from conveyor.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

Result = TypeVar("Result")

log = logging.getLogger("conveyor.event_loop")

EVENT_LOOP_ENV: Final = "CONVEYOR_EVENT_LOOP"

# How soon a closing loop looks again whether grpc still owes it completions, doubling up
# to the longest: each look scans the whole heap, which in a large application takes
# milliseconds, so a call left open must not make the close a busy loop of scans.
GRPC_SETTLE_POLL: Final = 0.005
GRPC_SETTLE_POLL_LONGEST: Final = 0.1

# Tasks left behind when their loop closed (they ignored their cancellation), referenced
# while they are pending so that they are never destroyed half-way: their coroutines would
# be closed by the garbage collector at any moment, in any thread, running the user's
# `finally` blocks there. One that ends while the loop finishes closing (its async
# generators) is dropped then; it used to be kept for the life of the process too. One still
# pending once the loop is closed can never run again, and is kept.
_ABANDONED: set[asyncio.Task[Any]] = set()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory to run on: uvloop's, or None for asyncio's own loop."""
    raw = os.environ.get(EVENT_LOOP_ENV, "")
    chosen = raw.strip().lower()
    if chosen not in {"", "asyncio", "uvloop"}:
        # A typo ("asycnio") ran uvloop without a word.
        raise ConfigError(f"{EVENT_LOOP_ENV}={raw!r}: expected asyncio or uvloop")
    if chosen == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional: absent on Windows
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(
    main: Coroutine[Any, Any, Result],
    *,
    close_within: float | None = None,
    on_exit_from_task: Callable[[BaseException], None] | None = None,
) -> Result:
    """`asyncio.run(main)` on the loop `loop_factory` picks.

    `close_within`: how long the tasks still running when `main` ends get to finish after
    their cancellation before the loop closes without them (None: as long as they take),
    and then how long grpc gets to hand the loop the completions it still owes it.

    `on_exit_from_task` (with `close_within`): asyncio lets a SystemExit or
    KeyboardInterrupt raised in any task out of the loop, having set it on that task, and
    the loop stops with `main` still running. Given, it is told of such an exception and
    the loop runs on (as asyncio.Runner does after a KeyboardInterrupt): whoever awaits the
    task gets the exception. A worker's loop runs in a thread of its own, which no signal
    reaches, so there they come from handlers' code: sys.exit in a task a handler started
    (asyncio.wait_for, gather, a TaskGroup) ended the whole worker.
    """
    if close_within is None:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(main)
    factory = loop_factory()
    loop = factory() if factory is not None else asyncio.new_event_loop()
    try:
        running = loop.create_task(main)
        while True:
            try:
                return loop.run_until_complete(running)
            except (SystemExit, KeyboardInterrupt) as exc:
                if on_exit_from_task is None or running.done():
                    raise
                on_exit_from_task(exc)
    finally:
        try:
            _cancel_remaining(loop, close_within)
            shutting = loop.create_task(loop.shutdown_asyncgens())
            loop.run_until_complete(asyncio.wait({shutting}, timeout=close_within))
            _abandon_pending({shutting})
            _settle_grpc(loop, close_within)
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


def _settle_grpc(loop: asyncio.AbstractEventLoop, within: float) -> None:
    """Run `loop` until grpc owes it no completion, or for `within` seconds at most."""

    async def settled() -> int:
        deadline = loop.time() + within
        pause = GRPC_SETTLE_POLL
        # Polled: grpc signals a completion to its own callback only.
        while (owed := _grpc_owes(loop)) and loop.time() < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 2, GRPC_SETTLE_POLL_LONGEST)
        return owed

    owed = loop.run_until_complete(settled())
    if owed:
        log.warning(
            "closing the event loop while grpc still owes it %d completion(s) (calls left "
            "open): grpc will fail to deliver them, and log 'Event loop is closed'",
            owed,
            extra={"event": "loop_closed_with_grpc_calls"},
        )


def _grpc_owes(loop: asyncio.AbstractEventLoop) -> int:
    """How many of grpc's batches in flight report to `loop`.

    grpc.aio has no API for this. Each batch in flight is a CallbackWrapper (which Core
    holds a reference to until it hands the completion to the loop) referring to a future
    of the loop that started it. A scan of the heap, done only while a loop closes.
    """
    cygrpc = sys.modules.get("grpc._cython.cygrpc")
    wrapper_type = getattr(cygrpc, "CallbackWrapper", None)
    if wrapper_type is None:
        return 0
    return sum(
        1
        for obj in gc.get_objects()
        if type(obj) is wrapper_type
        and any(
            isinstance(ref, asyncio.Future) and ref.get_loop() is loop
            for ref in gc.get_referents(obj)
        )
    )
