"""Planner statistics: the leader gathers the task table's statistics when they fall behind.

PostgreSQL plans every claim from statistics that autovacuum refreshes at most once a
minute (`autovacuum_naptime`), and only after a tenth of the table changed. Between a
burst of enqueues into a table its statistics call small (a fresh deployment, a backfill)
and that refresh, the planner believes a type has one queued task, and a claim that
should read 64 rows off `(type, state, seq)` in queue order instead reads every queued
task of the type with a bitmap scan and sorts them: measured in W1 with 150,000 tasks, the
claim went from 1-2 ms to 20-57 ms and the drain fell from about 10,000 to 4,800 tasks/s
(docs/performance.md, "The ninth round"). So the leader looks at PostgreSQL's count of
changed rows every `reaper_interval` (one row from its cumulative statistics, no scan) and
runs `ANALYZE conveyor_tasks` once the changes since the last one reach a fifth of the
rows it counted, and at least `MIN_CHANGED_ROWS`; never more often than
`MIN_ANALYZE_INTERVAL`, so a busy steady table costs an ANALYZE (a 30,000-row sample,
tens of milliseconds) every so often, not every second. Any server may run it; the leader
alone does, to do it once.

`ANALYZE (SKIP_LOCKED)` skips the table while another session holds it (autovacuum
vacuuming it, a VACUUM, CREATE INDEX CONCURRENTLY) and says so only with a WARNING. Such a
skip gathered nothing: it is counted apart (conveyor_task_table_analyze_skipped_total,
`locked`) and tried again at the next look, `reaper_interval` later, rather than after
`MIN_ANALYZE_INTERVAL` (a skip costs nothing to speak of: no sample was read). Any other
warning (the server's role may not analyze the table) is `refused`: it will not go away by
itself (until an administrator grants the role what it needs), so each refusal doubles the
wait before the next try, from `MIN_ANALYZE_INTERVAL` up to `MAX_REFUSED_INTERVAL`, and the
log's warnings thin out to one an hour instead of one every ten seconds forever.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

from conveyor.server.service import LeaderDuty
from conveyor.storage import queries

if TYPE_CHECKING:
    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.config import ServerConfig
    from conveyor.server.database import Database
    from conveyor.server.leadership import LeaderElector
    from conveyor.storage.queries import LeaderProof

log = logging.getLogger("conveyor.server.planner_statistics")

# Changes since the last ANALYZE, as a fraction of the rows it counted, that call for
# another: the estimates then may be off by a fifth or more.
STALE_FRACTION: Final = 0.2
# Fewer changed rows than this never matter to a plan.
MIN_CHANGED_ROWS: Final = 10_000
MIN_ANALYZE_INTERVAL: Final = 10.0
# The longest wait between tries while PostgreSQL refuses the role its ANALYZE: a grant
# made meanwhile is noticed within the hour.
MAX_REFUSED_INTERVAL: Final = 3600.0


class PlannerStatistics(LeaderDuty):
    """Keeps conveyor_tasks' planner statistics close to its contents (if this server leads)."""

    name = "planner-statistics"

    def __init__(
        self,
        config: ServerConfig,
        database: Database,
        elector: LeaderElector,
        metrics: ServerMetrics,
    ) -> None:
        """Look every `reaper_interval`; count each ANALYZE, and each skipped one, in `metrics`."""
        super().__init__(config.reaper_interval, database, elector)
        self._metrics = metrics
        self._last_analyze = float("-inf")
        # The wait after the last ANALYZE tried: MIN_ANALYZE_INTERVAL, longer while refused.
        self._interval = MIN_ANALYZE_INTERVAL
        # ANALYZEs skipped for a lock since the last one that ran: only the first is logged
        # at INFO (while autovacuum works on a big table, the leader tries every round).
        self._skipped_for_lock = 0

    async def lead(self, leader: LeaderProof) -> None:  # noqa: ARG002 - ANALYZE is not fenced
        """ANALYZE conveyor_tasks if its statistics fell behind."""
        if time.monotonic() - self._last_analyze < self._interval:
            return
        async with self._database.connection() as conn:
            changes = await queries.task_table_changes(conn)
            if changes is None or not stale(changes["changed"], changes["analyzed_rows"]):
                # Someone else's ANALYZE (autovacuum's, after its VACUUM) may have ended a
                # run of skips: the next one starts a new run, told again.
                self._skipped_for_lock = 0
                return
            # Set before the statement: one that fails (a statement timeout) is not tried
            # again at every round either.
            previous, self._last_analyze = self._last_analyze, time.monotonic()
            skipped = await queries.task_table_analyze(conn)
        if skipped is not None:
            self._skipped(skipped, previous)
            return
        self._metrics.task_table_analyzed.inc()
        self._interval = MIN_ANALYZE_INTERVAL
        after = (
            f", after {self._skipped_for_lock} attempt(s) skipped for a lock"
            if self._skipped_for_lock
            else ""
        )
        self._skipped_for_lock = 0
        log.info(
            "gathered the task table's planner statistics: %d rows changed since the last, "
            "which counted %d%s",
            changes["changed"],
            changes["analyzed_rows"],
            after,
            extra={"event": "task_table_analyzed"},
        )

    def _skipped(self, skipped: queries.AnalyzeSkipped, previous: float) -> None:
        """Count and log an ANALYZE that PostgreSQL skipped; arrange when to try again."""
        if not skipped.locked:
            self._metrics.task_table_analyze_skipped.labels("refused").inc()
            self._interval = refused_interval(self._interval)
            log.warning(
                "could not gather the task table's planner statistics: PostgreSQL skipped "
                "it (%s: %s); trying again in %ds",
                skipped.sqlstate,
                skipped.message,
                self._interval,
                extra={"event": "task_table_analyze_skipped", "reason": "refused"},
            )
            return
        self._metrics.task_table_analyze_skipped.labels("locked").inc()
        # Nothing was gathered: the statistics are as stale as before, so try again at the
        # next round instead of waiting out the interval an ANALYZE that ran would earn.
        self._last_analyze = previous
        self._skipped_for_lock += 1
        log.log(
            logging.INFO if self._skipped_for_lock == 1 else logging.DEBUG,
            "could not gather the task table's planner statistics yet: another session "
            "holds the table (autovacuum?) and PostgreSQL skipped it (%s); trying again "
            "every round",
            skipped.message,
            extra={"event": "task_table_analyze_skipped", "reason": "locked"},
        )


def stale(changed: int, analyzed_rows: int) -> bool:
    """Whether `changed` rows since an ANALYZE that counted `analyzed_rows` call for another."""
    return changed >= max(MIN_CHANGED_ROWS, STALE_FRACTION * analyzed_rows)


def refused_interval(interval: float) -> float:
    """The wait before the next try after a refused ANALYZE that followed a wait of `interval`."""
    return min(interval * 2, MAX_REFUSED_INTERVAL)
