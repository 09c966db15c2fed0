"""LoopWatchdog says which kind of starvation it sees.

A review ran 64 CPU-bound plain `def` handlers on 2 cores: they shared the interpreter
lock with the worker's event loop, no heartbeat got through, the worker was marked lost
and every task ran twice, while the warning blamed "an async handler running blocking
code" and advised making it a plain def handler, the very setup that failed.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from conveyor.worker.watchdog import LoopWatchdog


def blocked_warnings(caplog: pytest.LogCaptureFixture, sync_running: int) -> list[str]:
    async def block() -> None:
        watchdog = LoopWatchdog(
            asyncio.get_running_loop(),
            period=0.05,
            warn_after=0.1,
            sync_handlers_running=lambda: sync_running,
        )
        watchdog.start()
        try:
            time.sleep(0.5)  # noqa: ASYNC251 - blocking the loop is the point
            await asyncio.sleep(0.2)
        finally:
            watchdog.stop()

    with caplog.at_level(logging.WARNING, logger="conveyor.worker.watchdog"):
        asyncio.run(block())
    return [
        r.getMessage() for r in caplog.records if getattr(r, "event", "") == "event_loop_blocked"
    ]


def test_many_sync_handlers_are_named_as_the_cause(caplog: pytest.LogCaptureFixture) -> None:
    [warning] = blocked_warnings(caplog, sync_running=64)
    assert "64 plain def handlers" in warning
    assert "GIL" in warning
    assert "make it a plain def handler" not in warning


def test_otherwise_an_async_handler_is(caplog: pytest.LogCaptureFixture) -> None:
    [warning] = blocked_warnings(caplog, sync_running=0)
    assert "an async handler is running blocking code" in warning
