"""Every long-lived component survives start/stop cycles: no hang, no exception, no leak.

Start is idempotent, stop is safe before start and when repeated (the style brief's
`Service` contract), checked on the real components against a real database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from helpers import async_wait_for

from conveyor.monitoring.metrics import ServerMetrics
from conveyor.server.config import ServerConfig
from conveyor.server.database import Database
from conveyor.server.leadership import LeaderElector
from conveyor.server.maintenance import lease_reaper, retention
from conveyor.server.maintenance.lease_reaper import LeaseReaper
from conveyor.server.maintenance.retention import RetentionPruner
from conveyor.server.notifier import TaskNotifier
from conveyor.server.service import CATCH_UP_PAUSE, LeaderDuty, PeriodicService
from conveyor.storage.queries import LeaderProof

CYCLES = 50


class CountingService(PeriodicService):
    name = "counting"

    async def tick(self) -> None:
        await asyncio.sleep(0)


@pytest.fixture
async def database(database_url: str):
    config = ServerConfig(database_url=database_url, http_listen=None)
    db = Database(config)
    await db.connect(startup_timeout=timedelta(seconds=10))
    yield db
    await db.close()


def quick_elector(database: Database, server_id: str) -> LeaderElector:
    """An elector of `database` (not started) that campaigns every 50 ms."""
    return LeaderElector(
        database=database,
        server_id=server_id,
        ttl=timedelta(seconds=5),
        retry_interval=timedelta(milliseconds=50),
    )


class TestPeriodicService:
    async def test_many_start_stop_cycles_neither_hang_nor_raise(self) -> None:
        """50 cycles of start/stop, each bounded by a timeout, leave no task behind."""
        service = CountingService(timedelta(milliseconds=1))
        before = len(asyncio.all_tasks())
        for _ in range(CYCLES):
            service.start()
            service.start()  # idempotent
            await asyncio.wait_for(service.started.wait(), 2)
            await asyncio.wait_for(service.stop(), 2)
        assert len(asyncio.all_tasks()) == before
        assert service.ticks >= CYCLES

    async def test_stop_before_start_and_twice_is_harmless(self) -> None:
        """stop() before start() and a second stop() do nothing."""
        service = CountingService(timedelta(milliseconds=1))
        await service.stop()
        service.start()
        await service.stop()
        await service.stop()
        assert not service.started.is_set()

    async def test_a_failing_tick_does_not_end_the_loop(self) -> None:
        """An exception in one round is logged; the next round still runs."""
        rounds = []

        class Flaky(PeriodicService):
            name = "flaky"

            async def tick(self) -> None:
                rounds.append(1)
                if len(rounds) == 1:
                    raise RuntimeError("first round fails")

        service = Flaky(timedelta(milliseconds=1))
        service.start()
        try:
            await async_wait_for(lambda: len(rounds) >= 3, timeout=5)
        finally:
            await service.stop()
        assert len(rounds) >= 3


class TestLeaderElectorLifecycle:
    async def test_start_stop_cycles_each_elect_and_resign(self, database: Database) -> None:
        """Each cycle elects this server and resigns on stop; terms only grow."""
        terms = []
        for _ in range(10):
            elector = quick_elector(database, "lifecycle")
            await elector.stop()  # before start: harmless
            elector.start()
            elector.start()
            await async_wait_for(lambda e=elector: e.is_leader, timeout=5)
            assert elector.leadership is not None
            terms.append(elector.leadership.term)
            await asyncio.wait_for(elector.stop(), 5)
            await elector.stop()
            assert not elector.is_leader
        # Resigning ends the lease, so each new campaign starts a new term.
        assert terms == sorted(terms)
        assert len(set(terms)) == len(terms)

    async def test_a_failing_change_listener_ends_neither_renewals_nor_the_resignation(
        self, database: Database
    ) -> None:
        """A leadership listener that raises is logged: the elector keeps renewing its role
        and still resigns it on stop."""
        changes: list[LeaderProof | None] = []

        def broken_listener(proof: LeaderProof | None) -> None:
            changes.append(proof)
            raise RuntimeError("the listener is broken")

        elector = LeaderElector(
            database=database,
            server_id="broken-listener",
            ttl=timedelta(seconds=1.5),
            retry_interval=timedelta(milliseconds=50),
            on_change=broken_listener,
        )
        elector.start()
        try:
            await async_wait_for(lambda: elector.is_leader, timeout=5, what="the election")
            elected = await elector.current_leader()
            assert elected is not None

            async def renewed() -> bool:
                leader = await elector.current_leader()
                return leader is not None and leader.expires_at > elected.expires_at

            await async_wait_for(renewed, timeout=5, what="a renewal after the election")
        finally:
            await asyncio.wait_for(elector.stop(), 5)
        resigned = await elector.current_leader()
        assert resigned is not None
        assert (resigned.holder, resigned.active) == ("broken-listener", False)
        assert changes[0] is not None
        assert changes[-1] is None


class RecordingDuty(LeaderDuty):
    name = "recording"

    def __init__(self, database: Database, elector: LeaderElector) -> None:
        super().__init__(timedelta(milliseconds=20), database, elector)
        self.proofs: list[LeaderProof] = []

    async def lead(self, leader: LeaderProof) -> None:
        self.proofs.append(leader)


class TestLeaderDuty:
    async def test_only_the_leaders_duty_runs_and_a_successor_takes_it_over(
        self, database: Database
    ) -> None:
        """Two servers' duties tick side by side: only the leader's runs, with its proof;
        once it resigns, the other server's runs with the new term."""

        first, second = quick_elector(database, "first"), quick_elector(database, "second")
        first.start()
        await async_wait_for(lambda: first.is_leader, timeout=5)
        second.start()
        duties = [RecordingDuty(database, first), RecordingDuty(database, second)]
        for duty in duties:
            duty.start()
        try:
            await async_wait_for(lambda: duties[1].ticks >= 5, timeout=5)
            assert duties[0].proofs
            assert duties[1].proofs == []
            leading = first.leadership
            assert leading is not None
            assert {proof.term for proof in duties[0].proofs} == {leading.term}
            old_term = duties[0].proofs[-1].term
            await first.stop()  # resigns
            await async_wait_for(lambda: bool(duties[1].proofs), timeout=5)
            assert duties[1].proofs[0].term > old_term
        finally:
            for duty in duties:
                await duty.stop()
            await second.stop()
            await first.stop()


EXPIRED_LEASES = """
INSERT INTO conveyor_tasks (
    id, type, state, attempt, max_retries, timeout, started_at, worker_id, lease_id,
    lease_expires_at, deadline_at, payload
)
SELECT gen_random_uuid(), 'reap.me', 'running', 1, 3, interval '60 seconds', now(), 'gone',
       gen_random_uuid(), now() - interval '1 minute', now() + interval '1 minute', ''
FROM generate_series(1, $1)
"""


class ReaperThatLosesTheLead(LeaseReaper):
    """A real reaper whose server stops leading between its first batch and the next."""

    def leading(self) -> LeaderProof | None:
        return None


OLD_FINISHED = """
INSERT INTO conveyor_tasks (
    id, type, state, attempt, max_retries, timeout, started_at, finished_at, worker_id, payload
)
SELECT gen_random_uuid(), 'prune.me', 'succeeded', 1, 3, interval '60 seconds',
       now() - interval '9 days', now() - interval '8 days', 'w', ''
FROM generate_series(1, $1)
"""
# The queue-position mark the leader would have recorded after enqueueing them, as old.
OLD_FINISHED_MARK = """
INSERT INTO conveyor_seq_marks (marked_at, seq)
SELECT now() - interval '8 days', max(seq) FROM conveyor_tasks
"""


class PrunerThatLosesTheLead(RetentionPruner):
    """A real pruner whose server stops leading between its first batch and the next."""

    def leading(self) -> LeaderProof | None:
        return None


@contextlib.asynccontextmanager
async def leading(database: Database, server_id: str) -> AsyncIterator[LeaderElector]:
    """A real elector of `database` that leads, for as long as the block runs."""
    elector = quick_elector(database, server_id)
    elector.start()
    try:
        await async_wait_for(lambda: elector.is_leader, timeout=5)
        yield elector
    finally:
        await elector.stop()


async def count(database: Database, query: str) -> int:
    async with database.connection() as conn:
        value: int = await conn.fetchval(query)
    return value


class TestLeaderDutyBatches:
    @pytest.mark.parametrize(
        ("reaper_class", "left"),
        [(LeaseReaper, 0), (ReaperThatLosesTheLead, 100)],
    )
    async def test_a_round_of_batches_stops_when_the_lead_is_lost(
        self, database: Database, reaper_class: type[LeaseReaper], left: int
    ) -> None:
        """A round reaps batch after batch while its server leads, and no batch more once
        it does not: 600 expired leases are one round of two batches for a leader, and
        one batch (500) for a server that lost the lead after the first."""
        async with leading(database, "reaper") as elector:
            async with database.connection() as conn:
                await conn.execute(EXPIRED_LEASES, lease_reaper.BATCH_SIZE + 100)
            config = ServerConfig(database_url=database.url, http_listen=None)
            notifier = TaskNotifier(database.url, database.connect_options(), nothing_due)
            reaper = reaper_class(config, database, ServerMetrics(), notifier, elector)
            proof = elector.leadership
            assert proof is not None
            await reaper.lead(proof)
        running = "SELECT count(*) FROM conveyor_tasks WHERE state = 'running'"
        assert await count(database, running) == left

    @pytest.mark.parametrize(
        ("pruner_class", "left"),
        [(RetentionPruner, 0), (PrunerThatLosesTheLead, 100)],
    )
    async def test_retention_stops_between_batches_when_the_lead_is_lost(
        self, database: Database, pruner_class: type[RetentionPruner], left: int
    ) -> None:
        """The same for retention: 1,100 tasks past it are two batches for a leader, one for
        a server that lost the lead after the first."""
        async with leading(database, "pruner") as elector:
            async with database.connection() as conn:
                await conn.execute(OLD_FINISHED, retention.BATCH_SIZE + 100)
                await conn.execute(OLD_FINISHED_MARK)
            pruner = pruner_class(
                timedelta(hours=1), timedelta(days=7), database, elector, ServerMetrics()
            )
            proof = elector.leadership
            assert proof is not None
            await pruner.lead(proof)
        assert await count(database, "SELECT count(*) FROM conveyor_tasks") == left


class OneBatchPruner(RetentionPruner):
    """A real pruner whose rounds are one batch: 1,100 tasks past the retention leave it
    behind after a round."""

    max_batches = 1


def behind_gauge(metrics: ServerMetrics) -> float | None:
    return metrics.registry.get_sample_value("conveyor_tasks_prune_behind_seconds")


def retention_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        event
        for r in caplog.records
        if (event := getattr(r, "event", "")) in ("retention_behind", "retention_caught_up")
    ]


class TestRetentionBacklog:
    async def test_losing_the_lead_while_behind_is_not_catching_up(
        self, database: Database, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The leader's round leaves old tasks behind; then another server leads.

        The next round, not led, used to reset `behind` and log "retention caught up",
        though nothing had. Now this server stops counting without saying so, and waits a
        whole interval for its next round."""
        caplog.set_level(logging.INFO, logger="conveyor.server.retention")
        metrics = ServerMetrics()
        async with leading(database, "pruner") as elector:
            async with database.connection() as conn:
                await conn.execute(OLD_FINISHED, retention.BATCH_SIZE + 100)
                await conn.execute(OLD_FINISHED_MARK)
            pruner = OneBatchPruner(
                timedelta(hours=1), timedelta(days=7), database, elector, metrics
            )
            await pruner.tick()
            assert pruner.behind
            assert retention_events(caplog) == ["retention_behind"]
        assert elector.leadership is None
        await pruner.tick()

        assert retention_events(caplog) == ["retention_behind"]
        assert pruner.next_round_in() == timedelta(hours=1).total_seconds()
        assert behind_gauge(metrics) == 0

    async def test_a_failed_round_while_behind_keeps_the_backlog_and_comes_again_soon(
        self, database_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The leader's round leaves old tasks behind; its next round fails midway (its
        delete times out behind a lock the test holds).

        `behind` was reset at the round's start and the gauge skipped: the next round came
        a whole interval later although the backlog was still there, and the gauge stood
        still. Now the round after a failure comes after the catch-up pause, and the gauge
        goes on counting."""
        caplog.set_level(logging.INFO, logger="conveyor.server.retention")
        config = ServerConfig(
            database_url=database_url,
            http_listen=None,
            statement_timeout=timedelta(milliseconds=300),
        )
        database = Database(config)
        await database.connect(startup_timeout=timedelta(seconds=10))
        metrics = ServerMetrics()
        try:
            async with leading(database, "pruner") as elector:
                async with database.connection() as conn:
                    await conn.execute(OLD_FINISHED, retention.BATCH_SIZE + 100)
                    await conn.execute(OLD_FINISHED_MARK)
                pruner = OneBatchPruner(
                    timedelta(hours=1), timedelta(days=7), database, elector, metrics
                )
                await pruner.tick()
                assert pruner.behind
                after_first = behind_gauge(metrics)
                assert after_first is not None
                async with database.connection() as locker, locker.transaction():
                    await locker.execute("LOCK TABLE conveyor_seq_marks IN ACCESS EXCLUSIVE MODE")
                    with pytest.raises(Exception, match="statement timeout"):
                        await pruner.tick()

                assert pruner.behind
                assert pruner.next_round_in() == CATCH_UP_PAUSE
                gauge = behind_gauge(metrics)
                assert gauge is not None
                assert gauge > after_first
                assert retention_events(caplog) == ["retention_behind"]
        finally:
            await database.close()

    async def test_catching_up_records_one_queue_mark_per_interval(
        self, database: Database
    ) -> None:
        """Three rounds in a row, each behind (as a backlog is worked off, a second or so
        apart): each used to record a queue-position mark, kept for the whole retention.
        Now only the first does, as the next are within the retention interval of it."""
        async with leading(database, "pruner") as elector:
            async with database.connection() as conn:
                await conn.execute(OLD_FINISHED, 3 * retention.BATCH_SIZE + 100)
                await conn.execute(OLD_FINISHED_MARK)
            pruner = OneBatchPruner(
                timedelta(hours=1), timedelta(days=7), database, elector, ServerMetrics()
            )
            for _ in range(3):
                await pruner.tick()
                assert pruner.behind
        recent_marks = (
            "SELECT count(*) FROM conveyor_seq_marks WHERE marked_at > now() - interval '1 hour'"
        )
        assert await count(database, recent_marks) == 1


# `count` tasks that finished `ago`, each with its started and outcome events; their state
# goes round `states` (the tasks side by side in the queue order). Returns their ids.
FINISHED_WITH_HISTORY = """
WITH t AS (
  INSERT INTO conveyor_tasks (
      id, type, state, attempt, max_retries, timeout, started_at, finished_at, worker_id,
      payload
  )
  SELECT gen_random_uuid(), 'prune.me',
         ($2::conveyor_task_state[])[1 + g % cardinality($2::conveyor_task_state[])],
         1, 3, interval '60 seconds', now() - $3::interval, now() - $3::interval, 'w', ''
  FROM generate_series(1, $1) AS g
  RETURNING id, state
), history AS (
  INSERT INTO conveyor_task_events (task_id, event, state, attempt)
  SELECT id, e, state, 1 FROM t CROSS JOIN unnest(ARRAY['started', state::text]) AS e
)
SELECT id::text FROM t
"""


class SmallReadsPruner(RetentionPruner):
    """A real pruner with small numbers: batches of 5 that read at most 10 tasks of each
    state, three batches a round."""

    batch_size = 5
    read_limit = 10
    max_batches = 3


class TestRetentionReadLimit:
    async def test_old_tasks_behind_many_late_finished_ones_are_pruned_and_the_young_kept(
        self, database: Database
    ) -> None:
        """Tasks enqueued long ago that finished late (young: a type paused, or a backlog
        drained, for longer than the retention) come first in the walk, the old ones behind
        them. A round's first batch read all the young ones in one statement, and past a few
        million it ran out of the leader's statement budget every round. Now each batch
        reads at most its read limit per state, the round goes on after one that stopped
        there as after a full batch, and the next round goes on with the walk: the old tasks
        are deleted with their history, the young kept, over several rounds."""

        async def ids(count: int, states: list[str], ago: timedelta) -> set[str]:
            async with database.connection() as conn:
                rows = await conn.fetch(FINISHED_WITH_HISTORY, count, states, ago)
            return {row["id"] for row in rows}

        metrics = ServerMetrics()
        async with leading(database, "pruner") as elector:
            # An old one first, then 120 young ones of two states, then old ones of three.
            old = await ids(1, ["failed"], timedelta(days=8))
            young = await ids(120, ["succeeded", "failed"], timedelta(days=1))
            old |= await ids(21, ["succeeded", "failed", "cancelled"], timedelta(days=8))
            async with database.connection() as conn:
                await conn.execute(OLD_FINISHED_MARK)
            pruner = SmallReadsPruner(
                timedelta(hours=1), timedelta(days=7), database, elector, metrics
            )
            await pruner.tick()
            # Three batches of at most 10 a state, each saying there is more: the first old
            # task went, and the cancelled ones (no young one of theirs ahead of them), but
            # the walks of the other two states are not yet past the young ones.
            assert pruner.behind
            left_by_state = "SELECT state::text, count(*) FROM conveyor_tasks GROUP BY state"
            async with database.connection() as conn:
                first_round_left = dict(list(row) for row in await conn.fetch(left_by_state))
            assert first_round_left == {"succeeded": 60 + 7, "failed": 60 + 7}
            rounds = 1
            while pruner.behind:
                assert rounds < 20, "retention did not get past the young tasks"
                await pruner.tick()
                rounds += 1
        left = await count(database, "SELECT count(*) FROM conveyor_tasks")
        async with database.connection() as conn:
            kept = {row["id"] for row in await conn.fetch("SELECT id::text FROM conveyor_tasks")}
            histories = await conn.fetchval(
                "SELECT count(DISTINCT task_id) FROM conveyor_task_events"
            )
        assert (kept, left) == (young, len(young))
        assert histories == len(young)
        pruned = {
            state: metrics.registry.get_sample_value(
                "conveyor_tasks_pruned_total", {"state": state}
            )
            for state in ("succeeded", "failed", "cancelled")
        }
        assert sum(value or 0 for value in pruned.values()) == len(old)
        # Past 60 young ones of each of two states at 10 a batch and 3 a round (each round
        # going on from the last: starting over, none would get past 30), then 22 old ones
        # at 5 a batch: several rounds, the last of them caught up.
        assert rounds >= 3
        assert behind_gauge(metrics) == 0


async def nothing_due() -> bool:
    """A server's promotion of due retries when none is due: these tests schedule none."""
    return False


class TestNotifierLifecycle:
    async def test_start_stop_cycles_listen_each_time(self, database: Database) -> None:
        """Each cycle establishes LISTEN; stop() wakes waiters and leaves no task."""
        before = len(asyncio.all_tasks())
        for _ in range(10):
            notifier = TaskNotifier(database.url, database.connect_options(), nothing_due)
            await notifier.stop()
            notifier.start()
            notifier.start()
            await asyncio.wait_for(notifier.listening.wait(), 5)
            generation = notifier.generation
            await asyncio.wait_for(notifier.stop(), 5)
            await notifier.stop()
            assert notifier.generation > generation  # stop woke any waiter
        assert len(asyncio.all_tasks()) == before
