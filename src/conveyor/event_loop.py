"""The event loop the server and the workers run on: uvloop where it is installed.

uvloop is a dependency on every platform it supports (not Windows). Measured on the
benchmarks' 2-core machine in issue #5's sixth round, it took 7-10 % off the server's and
the workers' CPU per task, in the drain (W1) and at 200 tasks/s (W2) alike, once leases and
outcomes travelled as stream messages whose cost is mostly waking the loop.
`CONVEYOR_EVENT_LOOP=asyncio` keeps the standard loop (to compare, or to rule uvloop out).
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

Result = TypeVar("Result")


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


def run(main: Coroutine[Any, Any, Result]) -> Result:
    """`asyncio.run(main)` on the loop `loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
