"""Retention: the leader deletes finished tasks, and their history, once they are old enough.

A task that succeeded, failed or was cancelled more than `retention` ago (7 days by
default) is deleted with its history, in batches, oldest first, each batch one short
fenced statement (it writes nothing unless this server still holds its term) that reads
the tasks it deletes and not every finished one: each round marks the queue position
(seq) it has reached, and a batch stops at the newest mark older than the cutoff, since a
task that finished before then was enqueued before it; each batch goes on where the
previous one's walk reached, so tasks with an old position that finished late are read
once a walk, not once a batch, and a batch reads at most a few batches' worth of them
(however many there are, each batch stays a short statement): a batch that stopped at
that limit counts as full, as there is more to read. A round is at most
`MAX_BATCHES_PER_ROUND` batches; one that ends on a full batch is followed by the next
after a short pause, not after `retention_interval`, going on with the same walk, and
`conveyor_tasks_prune_behind_seconds` says for how long rounds have been ending so.
Keeping the hot table to live tasks and recent history is what keeps every per-task query
fast at any age of the deployment; operators who need the history longer export it first
or raise the retention (`--retention-days`, 0 to keep everything).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

from conveyor.server.service import BatchedLeaderDuty
from conveyor.storage import queries

if TYPE_CHECKING:
    from datetime import timedelta

    from prometheus_client import Counter

    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.database import Database
    from conveyor.server.leadership import LeaderElector
    from conveyor.storage.queries import LeaderProof

log = logging.getLogger("conveyor.server.retention")

BATCH_SIZE: Final = 1000
# Batches per round: a backlog of old tasks (a first run on a long-lived database, or more
# tasks finishing than a round deletes) is worked off over several rounds a short pause
# apart (BatchedLeaderDuty), never in one long burst of deletes.
MAX_BATCHES_PER_ROUND: Final = 20


class Pruner(BatchedLeaderDuty):
    """Deletes, in fenced batches, what is older than a retention (tasks, workers)."""

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
        """Prune every `interval` what is older than `retention`."""
        super().__init__(interval, database, elector)
        self._retention = retention
        self._metrics = metrics

    def tally(self, pruned: dict[str, int], counter: Counter, event: str, what: str) -> int:
        """Count a batch's deletions by state and log them; how many in all."""
        for state, count in pruned.items():
            counter.labels(state).inc(count)
        total = sum(pruned.values())
        if total:
            log.info(
                "deleted %d %s older than %s", total, what, self._retention, extra={"event": event}
            )
        return total


class RetentionPruner(Pruner):
    """Deletes finished tasks older than the retention (if this server leads)."""

    name = "retention"
    # Tasks of each final state one batch may read (None: queries.PRUNE_READ_BATCHES
    # batches' worth).
    read_limit: int | None = None

    def __init__(
        self,
        interval: timedelta,
        retention: timedelta,
        database: Database,
        elector: LeaderElector,
        metrics: ServerMetrics,
    ) -> None:
        """Prune every `interval` (sooner while behind) tasks finished `retention` ago."""
        super().__init__(interval, retention, database, elector, metrics)
        # The previous batch (where its walk reached), None before a walk's first: a round
        # goes on with the walk of the round before when that one ended behind.
        self._walk: queries.PruneBatch | None = None
        # When rounds started ending with old tasks left (monotonic), None while caught up.
        self._behind_since: float | None = None

    async def tick(self) -> None:
        """One round, then whether it left old tasks behind (the gauge, a log line)."""
        started = time.monotonic()
        try:
            await super().tick()
        finally:
            # Also after a round that failed: the gauge goes on counting a backlog that is
            # still there, instead of standing still at its value of the last round.
            self._track_backlog(started)
            if not (self.led and self.behind):
                # The walk reached the end (or the lead moved): the next round starts
                # afresh, and finds what has grown old below where this one went. A round
                # that left work behind is followed by one that goes on with its walk:
                # starting over, each would read again the same young tasks, as many as
                # its batches may read, and never get past more of them than that.
                self._walk = None

    def _track_backlog(self, round_started: float) -> None:
        if not self.led:
            # Another server leads: a backlog is its to report. This one stops counting
            # without saying retention caught up (it used to, when it lost the lead while
            # behind, although nothing had caught up).
            self._behind_since = None
            self._metrics.tasks_prune_behind.set(0)
            return
        if self.behind and self._behind_since is None:
            self._behind_since = round_started
            log.info(
                "retention is behind: a round ended with old finished tasks left, or more "
                "to read past young ones; the next round starts without waiting for the "
                "retention interval",
                extra={"event": "retention_behind"},
            )
        elif not self.behind and self._behind_since is not None:
            log.info(
                "retention caught up after %.0f s behind",
                time.monotonic() - self._behind_since,
                extra={"event": "retention_caught_up"},
            )
            self._behind_since = None
        behind_for = 0.0 if self._behind_since is None else time.monotonic() - self._behind_since
        self._metrics.tasks_prune_behind.set(behind_for)

    async def prepare(self, leader: LeaderProof) -> None:
        """Mark where the queue stands (a retention from now, it bounds a batch's walk).

        At most one mark per `interval`: rounds catching up on a backlog come faster.
        """
        async with self._database.connection() as conn:
            await queries.seq_mark_record(
                conn, retention=self._retention, leader=leader, spacing=self.interval
            )

    async def batch(self, leader: LeaderProof) -> int:
        """Delete a batch of old finished tasks, on from the previous batch's; how many.

        A batch that stopped at its read limit with more to read counts as full (it
        returns `batch_size`): it deleted fewer only because young tasks came first.
        """
        async with self._database.connection() as conn:
            self._walk = await queries.task_prune_finished(
                conn,
                retention=self._retention,
                limit=self.batch_size,
                leader=leader,
                # Three rounds of marks: a round or two missed (a tick failed, the lead
                # moved) still stops at the newest mark.
                mark_slack=3 * self.interval,
                after=self._walk,
                read_limit=self.read_limit,
            )
        deleted = self.tally(
            self._walk.pruned, self._metrics.tasks_pruned, "tasks_pruned", "finished task(s)"
        )
        return self.batch_size if self._walk.more else deleted
