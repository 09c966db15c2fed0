"""PeriodicService: the start/stop contract shared by every long-lived background loop.

`start` is idempotent, `stop` is safe before `start` and when called twice, and `started`
is an event tests can wait on. A tick that raises is logged and the loop carries on: a
maintenance loop must survive a database restart.

    stopped --start()--> running --stop()--> stopped
                            |  every `interval`: tick(); errors logged, never fatal
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import timedelta

log = logging.getLogger("conveyor.server.service")


class PeriodicService:
    """Runs `tick` every `interval` until stopped. Subclasses implement `tick`."""

    name = "service"

    def __init__(self, interval: timedelta) -> None:
        """Nothing runs until `start`."""
        self.interval = interval
        self.started = asyncio.Event()
        self.ticks = 0
        self._runner: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        """One round of work."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the loop (a second call does nothing)."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop the loop and wait for it (safe before start and when repeated)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        self.started.clear()

    async def _run(self) -> None:
        self.started.set()
        while True:
            try:
                await self.tick()
            except Exception as exc:
                log.warning(
                    "%s tick failed: %s", self.name, exc, extra={"event": "maintenance_error"}
                )
            self.ticks += 1
            await asyncio.sleep(self.interval.total_seconds())
