"""Worker sweeper: marks workers that stopped heartbeating as lost and ends their leases.

Leader only, fenced by the leader's term. Ending a lost worker's leases at once (instead of
waiting out the lease) is what makes recovery fast; it is safe because of fencing: if the
worker was merely slow, its next heartbeat learns the leases are gone and its reports are
refused, so no attempt gets two outcomes.

Silence is counted only while the database could be reached, as this server saw it: a
database that was down or cut off for longer than `worker_lost_after` took every heartbeat
with it, and the first sweep after it marked every worker lost, healthy ones included;
their finished work was refused and run again (found by stopping PostgreSQL for 18 s under
load). Each failure to reach the database starts that count again (`Database.reachable_for`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from conveyor.server.service import LeaderDuty
from conveyor.storage import queries

if TYPE_CHECKING:
    from conveyor.server.config import ServerConfig
    from conveyor.server.database import Database
    from conveyor.server.leadership import LeaderElector
    from conveyor.storage.queries import LeaderProof

log = logging.getLogger("conveyor.server.sweeper")


class WorkerSweeper(LeaderDuty):
    """Marks silent workers lost and releases their leases."""

    name = "worker-sweeper"

    def __init__(self, config: ServerConfig, database: Database, elector: LeaderElector) -> None:
        """Sweep every `reaper_interval`; silence beyond `worker_lost_after` means lost."""
        super().__init__(config.reaper_interval, database, elector)
        self._silence = config.worker_lost_after

    async def lead(self, leader: LeaderProof) -> None:
        """Mark silent workers lost."""
        async with self._database.connection() as conn:
            lost = await queries.worker_sweep_lost(
                conn,
                silence=self._silence,
                leader=leader,
                reachable_for=self._database.reachable_for(),
            )
        for row in lost:
            log.warning(
                "worker %s was silent for %.1fs (lost after %ss); marked lost, %d lease(s) "
                "released",
                row["id"],
                row["silent_for"],
                self._silence.total_seconds(),
                row["leases"],
                extra={"event": "worker_lost", "worker_id": row["id"]},
            )
