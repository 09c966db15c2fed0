"""Lease reaper: returns running tasks whose lease expired to the queue, or fails them.

Each round is one statement that locks expired rows with SKIP LOCKED, so several servers
running it at once never process the same task twice; leader election (issue #3) will make
it a leader-only loop to save the duplicate queries, not for correctness.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from conveyor.server.service import PeriodicService
from conveyor.storage import queries

if TYPE_CHECKING:
    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.config import ServerConfig
    from conveyor.server.database import Database
    from conveyor.server.notifier import TaskNotifier

log = logging.getLogger("conveyor.server.reaper")

BATCH_SIZE: Final = 500


class LeaseReaper(PeriodicService):
    """Requeues (or fails) tasks whose lease ran out."""

    name = "lease-reaper"

    def __init__(
        self,
        config: ServerConfig,
        database: Database,
        metrics: ServerMetrics,
        notifier: TaskNotifier,
    ) -> None:
        """Reap every `reaper_interval`."""
        super().__init__(config.reaper_interval)
        self._database = database
        self._notifier = notifier
        self._metrics = metrics
        self._backoff = queries.Backoff(
            base=config.retry_backoff_base, cap=config.retry_backoff_cap
        )

    async def tick(self) -> None:
        """Reap until no expired lease is left (in batches)."""
        while True:
            async with self._database.connection() as conn:
                rows = await queries.task_reap_expired(
                    conn, limit=BATCH_SIZE, backoff=self._backoff
                )
            for row in rows:
                outcome = "timed_out" if row["timed_out"] else "lease_expired"
                self._metrics.task_outcomes.labels(row["type"], outcome).inc()
                if row["state"] == "queued":
                    self._notifier.wake_after(row["retry_in"])
                log.info(
                    "lease of task %s expired; task is now %s",
                    row["id"],
                    row["state"],
                    extra={"event": "lease_expired", "task_id": str(row["id"])},
                )
            if len(rows) < BATCH_SIZE:
                return
