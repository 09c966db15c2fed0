"""Worker sweeper: marks workers that stopped heartbeating as lost.

Only bookkeeping for now: a lost worker's leases expire by themselves and the lease reaper
takes them back. Idempotent, so every server may run it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from conveyor.server.service import PeriodicService
from conveyor.storage import queries

if TYPE_CHECKING:
    from conveyor.server.config import ServerConfig
    from conveyor.server.database import Database

log = logging.getLogger("conveyor.server.sweeper")


class WorkerSweeper(PeriodicService):
    """Marks silent workers lost."""

    name = "worker-sweeper"

    def __init__(self, config: ServerConfig, database: Database) -> None:
        """Sweep every `reaper_interval`; silence beyond `worker_lost_after` means lost."""
        super().__init__(config.reaper_interval)
        self._database = database
        self._silence = config.worker_lost_after

    async def tick(self) -> None:
        """Mark silent workers lost."""
        async with self._database.connection() as conn:
            lost = await queries.worker_mark_lost(conn, silence=self._silence)
        for worker_id in lost:
            log.warning(
                "worker %s missed its heartbeats; marked lost",
                worker_id,
                extra={"event": "worker_lost", "worker_id": worker_id},
            )
