"""PeriodicService: the start/stop contract shared by every long-lived background loop.

`start` is idempotent, `stop` is safe before `start` and when called twice, and `started`
is an event tests can wait on. A tick that raises is logged and the loop carries on: a
maintenance loop must survive a database restart. `LeaderDuty` is the kind that only the
leader runs (the reaper, the sweeper, retention, planner statistics): every server runs
the loop, so a new leader takes the work over within one interval, and each round does
nothing unless this server leads, with the proof its fenced statements carry.

    stopped --start()--> running --stop()--> stopped
                            |  every `interval`: tick(); errors logged, never fatal
                            |  (a batched duty that left work behind: after a short pause)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from datetime import timedelta

    from conveyor.server.database import Database
    from conveyor.server.leadership import LeaderElector
    from conveyor.storage.queries import LeaderProof

log = logging.getLogger("conveyor.server.service")

# Between two rounds of a batched duty when the first left work behind (a retention
# backlog): long enough that the elector's renewal, which waits for the share lock every
# fenced batch holds on the leader row, and the other duties' statements get in, short
# enough that a backlog is deleted at about the database's pace (see retention.py).
CATCH_UP_PAUSE: Final = 0.5


class PeriodicService:
    """Runs `tick` every `interval` until stopped. Subclasses implement `tick`."""

    name = "service"

    def __init__(self, interval: timedelta) -> None:
        """Nothing runs until `start`."""
        self.interval = interval
        self.started = asyncio.Event()
        self.ticks = 0
        self._runner: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        """One round of work."""
        raise NotImplementedError

    def next_round_in(self) -> float:
        """Seconds until the next round: `interval`, unless a kind of loop has work left."""
        return self.interval.total_seconds()

    def start(self) -> None:
        """Start the loop (a second call does nothing)."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop the loop and wait for it (safe before start and when repeated)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        self.started.clear()

    async def _run(self) -> None:
        self.started.set()
        while True:
            try:
                await self.tick()
            except Exception as exc:
                # Named by type too: a driver error's text alone (or a bare TimeoutError's
                # empty one) does not say whether the database was down or refused us.
                log.warning(
                    "%s tick failed (%s: %s)",
                    self.name,
                    type(exc).__name__,
                    exc,
                    extra={"event": "maintenance_error"},
                )
            self.ticks += 1
            await asyncio.sleep(self.next_round_in())


class LeaderDuty(PeriodicService):
    """A PeriodicService whose rounds only the leader does: `lead` while this server leads."""

    def __init__(self, interval: timedelta, database: Database, elector: LeaderElector) -> None:
        """Every `interval`, `lead` with a proof of leadership, if this server holds one."""
        super().__init__(interval)
        self._database = database
        self._elector = elector

    async def tick(self) -> None:
        """One round of `lead`, or nothing if another server leads."""
        leader = self._elector.leadership
        if leader is not None:
            await self.lead(leader)

    async def lead(self, leader: LeaderProof) -> None:
        """One round of the leader's work; `leading()` again before each further batch."""
        raise NotImplementedError

    def leading(self) -> LeaderProof | None:
        """The current proof of leadership, or None once this server no longer leads."""
        return self._elector.leadership


class BatchedLeaderDuty(LeaderDuty):
    """A LeaderDuty whose round is batches of one fenced statement each (reap, prune).

    The round goes on while a batch comes back full and this server still leads (the proof
    is taken again before each batch), for at most `max_batches` batches (None: until a
    batch comes back short). A round that stops at `max_batches` with its last batch full
    leaves work behind (`behind`): the next round starts after `CATCH_UP_PAUSE`, not after
    `interval`, so a backlog is worked off in rounds of bounded length, with a breath
    between them, at whatever rate the database sustains rather than at one round per
    interval.
    """

    batch_size: int
    max_batches: int | None = None

    def __init__(self, interval: timedelta, database: Database, elector: LeaderElector) -> None:
        """Every `interval` (or sooner, while behind), batches while this server leads."""
        super().__init__(interval, database, elector)
        self.behind = False
        # Whether the latest round was this server's from start to end (it led throughout).
        self.led = False

    async def tick(self) -> None:
        """One round; `behind` says whether it stopped with full batches still coming.

        Known only from rounds this server leads: one another server leads leaves it False.
        A round that fails midway leaves it as it was: a backlog found before is still
        there, and the next round comes after the catch-up pause, not a whole interval.
        """
        leader = self._elector.leadership
        self.led = leader is not None
        if leader is None:
            self.behind = False
            return
        was_behind, self.behind = self.behind, False
        try:
            await self.lead(leader)
        except BaseException:
            self.behind = was_behind
            raise

    def next_round_in(self) -> float:
        """`interval`, or `CATCH_UP_PAUSE` (if shorter) after a round that left work behind."""
        if self.behind:
            return min(CATCH_UP_PAUSE, self.interval.total_seconds())
        return self.interval.total_seconds()

    async def lead(self, leader: LeaderProof) -> None:
        """`prepare`, then batches while they come back full and this server leads."""
        await self.prepare(leader)
        batches = 0
        while True:
            handled = await self.batch(leader)
            batches += 1
            next_leader = self.leading()
            if handled < self.batch_size:
                return
            if next_leader is None:
                # The lead moved mid-round: what is left is the new leader's to find.
                self.led = False
                return
            if self.max_batches is not None and batches >= self.max_batches:
                self.behind = True
                return
            leader = next_leader

    async def prepare(self, leader: LeaderProof) -> None:
        """Before the round's batches: nothing unless a duty needs it."""

    async def batch(self, leader: LeaderProof) -> int:
        """One batch; how many rows it handled (fewer than `batch_size`: the round ends)."""
        raise NotImplementedError
