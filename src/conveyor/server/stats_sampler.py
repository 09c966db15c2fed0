"""StatsSampler: reads the database-derived numbers on a schedule, never per scrape.

Every `stats_interval` it samples live tasks by state and type, the age of the oldest
available queued task per type, workers by state, paused types, and cluster-wide outcome
counts from the history in 5-second buckets, kept for the last hour: the dashboard's
per-minute charts and the "last minute" counts are both sums of buckets, and each tick
re-reads only the buckets that may still change (the last SETTLE_DELAY and the current
one), not the whole last minute; at a few thousand tasks a second that is the difference
between reading a quarter and all of a minute's history on every tick. It then sets the
gauges and keeps the snapshot that `/status` serves. A scrape or a status request
therefore costs no query, however often it comes. Runs on every server (each exports its
own /metrics); the queries read only live rows and the recent history. The live queue is
read by type only for the types named (see NAMED_TYPES), the others summed in the database
into one `OtherTypes`: a producer that invents a type per task makes neither a sample nor
anything built from it grow, and the totals stay exact.

While sampling fails or hangs (the database unreachable from this server, its pool
exhausted), the sampled gauges are withdrawn once the last sample is `stale_after` old:
a value this server no longer knows must not stand beside the fresh ones of the others,
where a frozen high queue would win the `max` the documented alerts take across servers.
`conveyor_stats_sampled_timestamp_seconds` stays, with the time of the last sample, as
the staleness signal (the `ConveyorStatsStale` alert); the next sample brings back every
series.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from conveyor.monitoring.metrics import MAX_TYPE_LABELS, OTHER_TYPES
from conveyor.server.service import PeriodicService
from conveyor.storage import queries
from conveyor.types import OtherTypes, TypeStatus

if TYPE_CHECKING:
    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.database import Database

RATE_WINDOW: Final = timedelta(minutes=1)
# Width of the history buckets; divides a minute, so buckets add up to whole minutes.
BUCKET: Final = timedelta(seconds=5)
SETTLE_DELAY: Final = timedelta(seconds=10)
CHART_WINDOW: Final = timedelta(hours=1)
OUTCOMES: Final = ("succeeded", "failed", "retried", "started")
# The types a sample names by need: as many as the metrics may label, so that a deployment
# with fewer types sees every one. Which ones: the oldest queued task first (a type nobody
# serves, or that is paused, keeps ageing), then the most queued, then the most running
# (see `task_live_stats`). Named on top of these: every paused type, and every type that
# has gauges of its own in this server's metrics (so each series stays exact, and a type
# seen before a flood of new ones keeps its row): at most twice this many, plus the paused.
NAMED_TYPES: Final = MAX_TYPE_LABELS
# A sample this many intervals old is stale, and its gauges are withdrawn: one slow or
# failed sample is not enough (a series that blinks out resets the `for:` of every alert
# on it), three in a row are. At least STALE_AFTER_AT_LEAST, for short test intervals.
STALE_AFTER_INTERVALS: Final = 3
STALE_AFTER_AT_LEAST: Final = timedelta(seconds=5)

log = logging.getLogger("conveyor.server.stats")


@dataclass
class StatsSnapshot:
    """The last sample; `taken_at` is 0 before the first one.

    `queued`, `running` and `oldest_queued_seconds` are by named type; `other` sums the
    types not named.
    """

    taken_at: float = 0.0
    queued: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    oldest_queued_seconds: dict[str, float] = field(default_factory=dict)
    other: OtherTypes = field(default_factory=OtherTypes)
    workers: dict[str, int] = field(default_factory=dict)
    last_minute: dict[str, int] = field(default_factory=dict)
    # What `last_minute` covers: the whole buckets of the last minute and the current one
    # so far, so between RATE_WINDOW - BUCKET and RATE_WINDOW.
    last_minute_seconds: float = RATE_WINDOW.total_seconds()
    paused: dict[str, str | None] = field(default_factory=dict)
    # Minute start -> outcome -> count, oldest first, over CHART_WINDOW.
    minutes: dict[datetime, dict[str, int]] = field(default_factory=dict)

    def type_statuses(self, paused: set[str]) -> tuple[TypeStatus, ...]:
        """The live queue of each named type, with `paused` (read fresher than this sample).

        A type paused since the sample, and not named in it, shows no tasks until the next
        sample: they are still counted in `other`.
        """
        return tuple(
            TypeStatus(
                type=name,
                queued=self.queued.get(name, 0),
                running=self.running.get(name, 0),
                oldest_queued_seconds=self.oldest_queued_seconds.get(name, 0.0),
                paused=name in paused,
            )
            for name in sorted(set(self.queued) | set(self.running) | paused)
        )

    def as_status(self, paused: set[str] | None = None) -> dict[str, Any]:
        """The `/status` fields built from this sample, with `paused` if read fresher.

        As in `type_statuses`: a type paused since the sample, and not named in it, shows
        no tasks until the next sample.
        """
        if paused is None:
            paused = set(self.paused)
        finished = self.last_minute.get("succeeded", 0) + self.last_minute.get("failed", 0)
        return {
            "sampled_at": self.taken_at or None,
            "queue": {
                "queued": sum(self.queued.values()) + self.other.queued,
                "running": sum(self.running.values()) + self.other.running,
                "by_type": {
                    task_type: {
                        "queued": self.queued.get(task_type, 0),
                        "running": self.running.get(task_type, 0),
                        "oldest_queued_seconds": round(
                            self.oldest_queued_seconds.get(task_type, 0.0), 3
                        ),
                        "paused": task_type in paused,
                    }
                    for task_type in sorted(set(self.queued) | set(self.running) | paused)
                },
                "other_types": {
                    "types": self.other.types,
                    "queued": self.other.queued,
                    "running": self.other.running,
                    "oldest_queued_seconds": round(self.other.oldest_queued_seconds, 3),
                },
            },
            "paused_types": sorted(paused),
            "oldest_queued_seconds": round(
                max([self.other.oldest_queued_seconds, *self.oldest_queued_seconds.values()]), 3
            ),
            "workers": self.workers,
            "last_minute": {
                **self.last_minute,
                "window_seconds": round(self.last_minute_seconds, 3),
                "throughput_per_second": round(finished / self.last_minute_seconds, 3),
                "failure_rate": round(self.last_minute.get("failed", 0) / finished, 4)
                if finished
                else 0.0,
            },
        }


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _bucket(moment: datetime) -> datetime:
    """The start of the BUCKET `moment` falls in (the database's `date_bin` agrees)."""
    width = int(BUCKET.total_seconds())
    return moment.replace(second=moment.second - moment.second % width, microsecond=0)


class StatsSampler(PeriodicService):
    """Samples the database into gauges and a status snapshot."""

    name = "stats-sampler"

    def __init__(self, interval: timedelta, database: Database, metrics: ServerMetrics) -> None:
        """Sample every `interval`."""
        super().__init__(interval)
        self._database = database
        self._metrics = metrics
        self.snapshot = StatsSnapshot()
        self.stale_after = max(interval * STALE_AFTER_INTERVALS, STALE_AFTER_AT_LEAST)
        # When the gauges were last set, by the event loop's clock; None before the first
        # sample and while they are withdrawn.
        self._published_at: float | None = None
        self._known_types: set[str] = set()
        self._buckets: dict[datetime, dict[str, int]] = {}
        # Every bucket before this one has been read after it ended: it is final.
        self._settled: datetime | None = None

    async def tick(self) -> None:
        """Take one sample and publish it; withdraw the gauges once the last one is stale.

        Also while the sample hangs (a lock, a pool with no connection free): the gauges
        go at `stale_after`, not when a statement timeout finally ends the tick.
        """
        sampling = asyncio.ensure_future(self._sample())
        try:
            if self._published_at is not None:
                fresh_for = self._published_at + self.stale_after.total_seconds()
                await asyncio.wait(
                    {sampling}, timeout=max(fresh_for - asyncio.get_running_loop().time(), 0.0)
                )
                if not sampling.done():
                    self._withdraw()
            snapshot = await sampling
        except Exception:
            if self._stale():
                self._withdraw()
            raise
        finally:
            sampling.cancel()  # only if this tick was cancelled (the sampler stops)
        self._publish(snapshot)
        self.snapshot = snapshot

    def _stale(self) -> bool:
        """Whether the published gauges are `stale_after` old."""
        return (
            self._published_at is not None
            and asyncio.get_running_loop().time() - self._published_at
            >= self.stale_after.total_seconds()
        )

    def _withdraw(self) -> None:
        """Stop exporting the sampled gauges until the next sample (see the module's doc).

        Removed rather than set to NaN: Prometheus marks a series that leaves the
        exposition stale at once, so queries and alerts see no value from this server, as
        from a server that is down; a NaN would be charted and aggregated as a value.
        """
        if self._published_at is None:
            return
        log.warning(
            "the stats sample is over %.0fs old; the sampled gauges are withdrawn until the "
            "next sample",
            self.stale_after.total_seconds(),
            extra={"event": "stats_stale"},
        )
        self._published_at = None
        metrics = self._metrics
        for gauge in (
            metrics.tasks_by_state,
            metrics.oldest_queued,
            metrics.workers_by_state,
            metrics.type_paused,
        ):
            gauge.clear()

    async def _sample(self) -> StatsSnapshot:
        """Read one sample from the database, from one snapshot.

        Separate statements let a pause commit between the counts and the paused list: the
        type was then summed among the others and listed too, counted twice (a CI run of
        test_type_bounds found it).
        """
        async with self._database.snapshot() as conn:
            live = await queries.task_live_stats(
                conn, named=NAMED_TYPES, also=self._known_types - {OTHER_TYPES}
            )
            workers = await queries.worker_count_by_state(conn)
            paused = await queries.paused_type_list(conn)
            now = await queries.database_now(conn)
            await self._sample_buckets(conn, now)
        window_start = _bucket(now) - (RATE_WINDOW - BUCKET)
        last_minute = dict.fromkeys(OUTCOMES, 0)
        minutes: dict[datetime, dict[str, int]] = {}
        for start, counts in sorted(self._buckets.items()):
            minute = minutes.setdefault(_minute(start), dict.fromkeys(OUTCOMES, 0))
            for outcome in OUTCOMES:
                minute[outcome] += counts[outcome]
                if start >= window_start:
                    last_minute[outcome] += counts[outcome]
        named = [row for row in live if row["type"] is not None]
        other = next((row for row in live if row["type"] is None), None)
        return StatsSnapshot(
            taken_at=time.time(),
            queued={row["type"]: row["queued"] for row in named},
            running={row["type"]: row["running"] for row in named},
            oldest_queued_seconds={row["type"]: row["oldest_queued_seconds"] for row in named},
            other=OtherTypes(
                types=other["types"],
                queued=other["queued"],
                running=other["running"],
                oldest_queued_seconds=other["oldest_queued_seconds"],
            )
            if other is not None
            else OtherTypes(),
            workers=workers,
            last_minute=last_minute,
            last_minute_seconds=max((now - window_start).total_seconds(), 1.0),
            paused={row["type"]: row["reason"] for row in paused},
            minutes=minutes,
        )

    async def _sample_buckets(self, conn: Any, now: datetime) -> None:
        """Bring the outcome buckets of the last CHART_WINDOW up to date.

        Buckets are judged by the database's clock, which stamps the events, and a bucket
        is final only once read SETTLE_DELAY after it ended: an event is stamped when its
        transaction starts, so it may commit a little after its bucket is over. Only the
        buckets not yet final are read again.
        """
        horizon = _minute(now) - CHART_WINDOW
        since = self._settled if self._settled is not None else horizon
        rows = await queries.task_event_buckets(conn, since=since, width=BUCKET)
        self._buckets = {
            start: counts for start, counts in self._buckets.items() if horizon <= start < since
        }
        for row in rows:
            self._buckets[row["bucket"]] = {outcome: row[outcome] for outcome in OUTCOMES}
        self._settled = _bucket(now - SETTLE_DELAY)

    def _publish(self, snapshot: StatsSnapshot) -> None:
        metrics = self._metrics
        label = metrics.type_label
        # By label: types past the metrics' bound, and those the sample did not name, are
        # summed into one series (the oldest age is their oldest).
        queued: dict[str, int] = {}
        running: dict[str, int] = {}
        oldest: dict[str, float] = {}
        if snapshot.other.types:
            queued[OTHER_TYPES] = snapshot.other.queued
            running[OTHER_TYPES] = snapshot.other.running
            oldest[OTHER_TYPES] = snapshot.other.oldest_queued_seconds
        paused: set[str] = {label(task_type) for task_type in snapshot.paused}
        for task_type, count in snapshot.queued.items():
            queued[label(task_type)] = queued.get(label(task_type), 0) + count
        for task_type, count in snapshot.running.items():
            running[label(task_type)] = running.get(label(task_type), 0) + count
        for task_type, age in snapshot.oldest_queued_seconds.items():
            oldest[label(task_type)] = max(oldest.get(label(task_type), 0.0), age)
        # A type whose queue drained must read 0, not keep its last value.
        self._known_types |= set(queued) | set(running) | paused
        for task_type in self._known_types:
            metrics.type_paused.labels(task_type).set(1 if task_type in paused else 0)
            metrics.tasks_by_state.labels("queued", task_type).set(queued.get(task_type, 0))
            metrics.tasks_by_state.labels("running", task_type).set(running.get(task_type, 0))
            metrics.oldest_queued.labels(task_type).set(oldest.get(task_type, 0.0))
        for state in ("active", "draining", "lost", "stopped"):
            metrics.workers_by_state.labels(state).set(snapshot.workers.get(state, 0))
        metrics.last_sample.set(snapshot.taken_at)
        self._published_at = asyncio.get_running_loop().time()
