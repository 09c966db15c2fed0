"""LeaderElector: which server runs the singleton maintenance work, decided by PostgreSQL.

The role is a row in `conveyor_leader` (see migration 0002). A server takes it when it is
free or expired and renews it every `leader_ttl / 3`, with the database's clock judging
expiry, so skewed server clocks cannot make two leaders. `term` grows on every change of
holder and after any lapse, and is the fencing token of leader-only writes: each one checks
(holder, term, expires_at > now()) in the same statement, holding the row FOR SHARE, so a
leader that was paused (SIGSTOP, GC, a partition) past its lease writes nothing with its old
term even if it still believes it leads.

    follower --elected--> leader --renewal refused or failing past the lease--> follower
    leader --resign() (shutdown)--> follower; NOTIFY lets the others take over at once
    any --stop()--> stopped

The elector also steps down on its own when it has not renewed for a whole TTL (measured
on the local monotonic clock from the last successful renewal), which keeps a partitioned
leader from running loops that the database would refuse anyway.

No error ends the campaign: a round that fails in any way (the database unavailable,
refusing the login, a bug) is logged and the next one runs after the usual interval. Were
the loop to end, this server would never lead again, and if every server's did (a
connection storm after a PostgreSQL restart), nothing would reap expired leases any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import ConveyorError
from conveyor.storage import queries
from conveyor.storage.queries import LeaderProof

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime, timedelta

    from conveyor.server.database import Database

log = logging.getLogger("conveyor.server.leadership")

MAINTENANCE_ROLE: Final = "maintenance"


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """Who leads, as the database says."""

    holder: str
    term: int
    elected_at: datetime
    expires_at: datetime
    active: bool


class LeaderElector:
    """Campaigns for the maintenance role and tells its holder's loops whether to run."""

    def __init__(
        self,
        *,
        database: Database,
        server_id: str,
        ttl: timedelta,
        retry_interval: timedelta,
        on_change: Callable[[LeaderProof | None], None] | None = None,
    ) -> None:
        """Nothing runs until `start`."""
        self._database = database
        self.server_id = server_id
        self.ttl = ttl
        self._retry_interval = retry_interval
        self._on_change = on_change
        self._leadership: LeaderProof | None = None
        self._renewed_at = 0.0
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        # The kind of unexpected error the previous round ended with, if it did.
        self._unexpected: type[Exception] | None = None
        self.started = asyncio.Event()

    @property
    def leadership(self) -> LeaderProof | None:
        """The current proof of leadership, or None when following (or lapsed locally)."""
        if self._leadership is not None and self._lapsed():
            self._set(None, reason="no successful renewal for a whole TTL")
        return self._leadership

    @property
    def is_leader(self) -> bool:
        """Whether this server believes it leads (the database still fences every write)."""
        return self.leadership is not None

    def _lapsed(self) -> bool:
        return time.monotonic() - self._renewed_at >= self.ttl.total_seconds()

    def wake(self) -> None:
        """Campaign now (the leader resigned)."""
        self._wake.set()

    def start(self) -> None:
        """Begin campaigning (idempotent)."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="leader-elector")

    async def stop(self, *, resign: bool = True) -> None:
        """Stop campaigning; resign at once so another server takes over without waiting."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            try:
                await runner
            except asyncio.CancelledError:
                pass
            except Exception:
                # `_run` survives its rounds' errors; should one end it all the same, the
                # resignation below must still run, or the others wait out the TTL.
                log.exception(
                    "the leader election loop had failed", extra={"event": "election_error"}
                )
        if resign and self._leadership is not None:
            await self._resign(self._leadership.term)
        self._set(None, reason="stopped")
        self.started.clear()

    async def _resign(self, term: int) -> None:
        try:
            async with self._database.priority_connection() as conn:
                await queries.leader_resign(
                    conn, name=MAINTENANCE_ROLE, holder=self.server_id, term=term
                )
        except Exception as exc:
            log.warning(
                "could not resign leadership (%s: %s); another server takes over when the "
                "role expires",
                type(exc).__name__,
                exc,
                extra={"event": "leader_resign_failed"},
            )
        else:
            log.info("resigned leadership", extra={"event": "leader_resigned"})

    async def _run(self) -> None:
        self.started.set()
        while True:
            # Cleared before the campaign, not after: a resignation heard while the campaign
            # ran (it found the role still held) was lost, and the follower waited out its
            # retry interval instead of campaigning again at once.
            self._wake.clear()
            try:
                await self._campaign()
            except Exception as exc:
                # Whatever failed, the round's renewal did not happen (or is not known to
                # have): the role is kept only as long as the last renewal proves it.
                self._log_unexpected(exc)
                self._step_down_if_lapsed()
            else:
                self._unexpected = None
            interval = (
                self.ttl.total_seconds() / 3
                if self._leadership is not None
                else self._retry_interval.total_seconds()
            )
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives as the event fires, and stop() would then hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()

    async def _campaign(self) -> None:
        attempt_started = time.monotonic()
        # Renewed only in the term this process won: another process started with the
        # same server id (a fixed --server-id) must not lead beside it in the same term.
        held = self.leadership
        try:
            async with self._database.priority_connection() as conn:
                row = await queries.leader_attempt_elect(
                    conn,
                    name=MAINTENANCE_ROLE,
                    holder=self.server_id,
                    ttl=self.ttl,
                    term=held.term if held is not None else None,
                )
        except ConveyorError as exc:
            log.warning("leader election round failed: %s", exc, extra={"event": "election_failed"})
            self._step_down_if_lapsed()
            return
        if row is None:
            self._set(None, reason="another server holds the role")
            return
        self._renewed_at = attempt_started
        proof = LeaderProof(
            holder=self.server_id, term=int(row["term"]), statement_timeout=self.ttl / 3
        )
        self._set(proof, reason="elected")

    def _step_down_if_lapsed(self) -> None:
        """After a failed round: a leader keeps its role only until its lease would lapse.

        The last successful renewal proves the term until then (measured from before that
        renewal was sent, so the database's lease lasts at least as long), and every
        leader-only write is fenced by the database in any case.
        """
        _ = self.leadership

    def _log_unexpected(self, exc: Exception) -> None:
        """Log a round's unexpected error loudly; its traceback once per streak of a kind.

        A follower campaigns every second: a configuration error (a refused login) would
        otherwise repeat the same traceback every second for as long as it lasts.
        """
        repeated = type(exc) is self._unexpected
        self._unexpected = type(exc)
        log.error(
            "leader election round failed unexpectedly (%s: %s); campaigning on",
            type(exc).__name__,
            exc,
            exc_info=None if repeated else exc,
            # Not `election_failed` (the database unavailable, a warning): this one
            # needs a person, a bug or a configuration error such as a refused login.
            extra={"event": "election_error"},
        )

    def _set(self, leadership: LeaderProof | None, *, reason: str) -> None:
        if leadership == self._leadership:
            return
        previous, self._leadership = self._leadership, leadership
        if leadership is not None:
            log.info(
                "this server leads (term %d)",
                leadership.term,
                extra={"event": "leader_elected", "term": leadership.term},
            )
        elif previous is not None:
            log.log(
                logging.INFO if reason == "stopped" else logging.WARNING,
                "this server no longer leads (term %d): %s",
                previous.term,
                reason,
                extra={"event": "leader_lost", "term": previous.term},
            )
        if self._on_change is not None:
            try:
                self._on_change(leadership)
            except Exception:
                # A listener (the metrics) must not leave the elector half-updated or end
                # its loop: the role is what the database said, whatever the listener did.
                log.exception(
                    "a leadership change listener failed", extra={"event": "election_error"}
                )

    async def current_leader(self) -> LeaderInfo | None:
        """Who leads according to the database (None before any election).

        Read through the main pool: status pages and `conveyor stats` poll this, and the
        reserved pool is kept for elections and heartbeats.
        """
        async with self._database.connection() as conn:
            row: Any = await queries.leader_get(conn, name=MAINTENANCE_ROLE)
        if row is None:
            return None
        return LeaderInfo(
            holder=row["holder"],
            term=int(row["term"]),
            elected_at=row["elected_at"],
            expires_at=row["expires_at"],
            active=bool(row["active"]),
        )
