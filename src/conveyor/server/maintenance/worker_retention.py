"""Worker retention: the leader deletes workers that are gone, once gone long enough.

Every worker process registers under a fresh id (host-pid-random), so rows of stopped and
lost workers would pile up for ever: `conveyor workers` and ListWorkers would list every
worker that ever ran, `conveyor_workers{state="lost"}` would only grow, and the sweeper
scans the table every second. A worker that stopped or was lost more than
`worker_retention` ago (24 h by default) is deleted, in batches, longest silent first, each
batch one short fenced statement. Nothing needs the row afterwards: tasks and their history
keep the worker's id as text, and a lookup that finds no row reads an unknown worker.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from conveyor.server.service import BatchedLeaderDuty
from conveyor.storage import queries

if TYPE_CHECKING:
    from datetime import timedelta

    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.database import Database
    from conveyor.server.leadership import LeaderElector
    from conveyor.storage.queries import LeaderProof

log = logging.getLogger("conveyor.server.worker_retention")

BATCH_SIZE: Final = 1000
# Batches per round: a first run on a long-lived database works its backlog off over
# several rounds, never in one long burst of deletes.
MAX_BATCHES_PER_ROUND: Final = 20


class WorkerPruner(BatchedLeaderDuty):
    """Deletes workers stopped or lost longer than the worker retention (if this server leads)."""

    name = "worker-retention"
    batch_size = BATCH_SIZE
    max_batches = MAX_BATCHES_PER_ROUND

    def __init__(
        self,
        interval: timedelta,
        retention: timedelta,
        database: Database,
        elector: LeaderElector,
        metrics: ServerMetrics,
    ) -> None:
        """Prune every `interval` the workers last heard from more than `retention` ago."""
        super().__init__(interval, database, elector)
        self._retention = retention
        self._metrics = metrics

    async def batch(self, leader: LeaderProof) -> int:
        """Delete a batch of gone workers; how many."""
        async with self._database.connection() as conn:
            pruned = await queries.worker_prune_gone(
                conn, retention=self._retention, limit=BATCH_SIZE, leader=leader
            )
        for state, count in pruned.items():
            self._metrics.workers_pruned.labels(state).inc(count)
        total = sum(pruned.values())
        if total:
            log.info(
                "deleted %d worker(s) stopped or lost more than %s ago",
                total,
                self._retention,
                extra={"event": "workers_pruned"},
            )
        return total
