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

from typing import TYPE_CHECKING

from conveyor.server.maintenance.retention import Pruner
from conveyor.storage import queries

if TYPE_CHECKING:
    from conveyor.storage.queries import LeaderProof


class WorkerPruner(Pruner):
    """Deletes workers stopped or lost longer than the worker retention (if this server leads)."""

    name = "worker-retention"

    async def batch(self, leader: LeaderProof) -> int:
        """Delete a batch of gone workers; how many."""
        async with self._database.connection() as conn:
            pruned = await queries.worker_prune_gone(
                conn, retention=self._retention, limit=self.batch_size, leader=leader
            )
        return self.tally(
            pruned, self._metrics.workers_pruned, "workers_pruned", "stopped or lost worker(s)"
        )
