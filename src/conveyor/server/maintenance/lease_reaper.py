"""Lease reaper: schedules running tasks whose lease expired for a retry, or fails them.

Leader only. Each round is one statement fenced by the leader's term (see leadership.py):
a server that lost the role, even without knowing it yet, writes nothing. Each round also
promotes the retries whose backoff has ended into the queue (see notifier.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from conveyor.server.service import BatchedLeaderDuty
from conveyor.storage import queries

if TYPE_CHECKING:
    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.config import ServerConfig
    from conveyor.server.database import Database
    from conveyor.server.leadership import LeaderElector
    from conveyor.server.notifier import TaskNotifier
    from conveyor.storage.queries import LeaderProof

log = logging.getLogger("conveyor.server.reaper")

BATCH_SIZE: Final = 500


class LeaseReaper(BatchedLeaderDuty):
    """Requeues (or fails) tasks whose lease ran out."""

    name = "lease-reaper"
    batch_size = BATCH_SIZE

    def __init__(
        self,
        config: ServerConfig,
        database: Database,
        metrics: ServerMetrics,
        notifier: TaskNotifier,
        elector: LeaderElector,
    ) -> None:
        """Reap every `reaper_interval` while this server leads."""
        super().__init__(config.reaper_interval, database, elector)
        self._notifier = notifier
        self._metrics = metrics
        self._backoff = queries.Backoff(
            base=config.retry_backoff_base, cap=config.retry_backoff_cap
        )

    async def prepare(self, leader: LeaderProof) -> None:  # noqa: ARG002 - not fenced
        """Promote the retries that are due, whichever server scheduled them.

        Each server promotes its own retries when their backoff ends (`wake_after`); a
        server that died took those timers with it, and this round finds their tasks
        within `reaper_interval` of becoming due.
        """
        self._notifier.wake_after(0)

    async def batch(self, leader: LeaderProof) -> int:
        """Reap a batch of expired leases; how many (the round goes on while none is left)."""
        async with self._database.connection() as conn:
            rows = await queries.task_reap_expired(
                conn, limit=BATCH_SIZE, backoff=self._backoff, leader=leader
            )
        for row in rows:
            cause = "timed_out" if row["timed_out"] else "lease_expired"
            self._metrics.count_cut_short(row["type"], cause)
            self._metrics.task_outcomes.labels(
                self._metrics.type_label(row["type"]),
                queries.attempt_outcome(row["state"], "retried"),
            ).inc()
            if row["state"] == "scheduled":
                self._notifier.wake_after(row["retry_in"])
            log.info(
                "lease of task %s expired; task is now %s",
                row["id"],
                row["state"],
                extra={
                    "event": cause,
                    "task_id": str(row["id"]),
                    "task_type": row["type"],
                    "attempt": row["attempt"],
                    "worker_id": row["worker_id"],
                },
            )
        return len(rows)
