"""HandoffDesk: an enqueue leases its tasks straight to the long polls waiting for them.

A long poll that found nothing waits for a wake-up, then claims. For a task enqueued while
a worker of its type waits in this server, that path costs the enqueue's commit, a wake-up,
a claim statement and the claim's own commit before the lease can leave, and most of the
start latency of a lightly loaded queue was there. So a waiting poll also leaves an
*offer* at this desk (its worker, task types and how many tasks it takes), and the enqueue
looks here first: it reserves offers for its tasks, and its one insert statement
(`task_insert_leasing`) writes each offered task already leased to that worker, with its
`started` event, in the same commit. The poll then answers with those leases at once.

The statement decides, not the desk: a task skips the queue only when its type has nothing
queued and available (an older task must start first: FIFO) and is not paused; any other
offered task is inserted queued, the poll gets nothing from the desk, and it claims as it
would have. Leases handed over this way are ordinary leases: fenced, heartbeated, expired
by the reaper if the worker never reports.

States of an offer:

    open --reserve--> reserved --settle--> delivered (rows, maybe none)
    open --close--> closed
    reserved --close(abandon)--> abandoned --settle--> its rows are handed back (released)

A reserved offer cannot be withdrawn until its enqueue's statement returns: the rows are
known only then. A poll that stops waiting meanwhile (woken, timed out) waits for them; a
poll whose call was cancelled abandons them, and the desk hands its leases back through
`release` so no task waits for a lease expiry.

A Work stream leaves an offer the same way while it writes a lease message and has room
left (work_stream.py), and settles or abandons it as a poll does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from datetime import timedelta

log = logging.getLogger("conveyor.server.handoff")

# Why a handed-over lease went back to the queue (the `released` event's detail).
POLL_ENDED: Final = (
    "lease not delivered: the worker's long poll or Work stream ended before the lease an "
    "enqueue handed it could be sent"
)
STATEMENT_FAILED: Final = "lease not delivered: the enqueue's statement failed as it ran"


@dataclass(eq=False)
class Offer:
    """A waiting long poll (or a writing stream's room): what it takes, where it goes."""

    worker_id: str
    task_types: frozenset[str]
    limit: int
    # The lease the worker gets (WorkerService.lease_ttl_known): its registered pace.
    lease_ttl: timedelta
    # Tasks reserved for it by an enqueue in flight (0 while open).
    reserved: int = 0
    abandoned: bool = False
    delivered: asyncio.Future[list[Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class HandoffDesk:
    """The offers of this server's waiting long polls and writing streams (one event loop)."""

    def __init__(self, release: Callable[[list[Any], str, str], Awaitable[None]]) -> None:
        """`release(rows, worker_id, reason)` hands back leases no poll can deliver."""
        self._release = release
        # Open offers by task type, each in the order its polls began to wait (dicts as
        # ordered sets): the longest-waiting worker gets the next task, which spreads work
        # over the fleet as the claims' turns do, and a type no poll waits for costs one
        # lookup however many polls wait for other types.
        self._open: dict[str, dict[Offer, None]] = {}
        self._releasing: set[asyncio.Task[None]] = set()
        # Reserved offers not yet settled, and an event set while there are none and no
        # hand-back runs (what a stopping server waits for).
        self._unsettled = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self.closed = False

    def open(
        self, worker_id: str, task_types: Sequence[str], limit: int, lease_ttl: timedelta
    ) -> Offer:
        """Leave an offer for a poll about to wait; `close` it when the wait ends.

        A Work stream leaves one for its remaining room while it writes a lease message.
        `lease_ttl`: how long a lease handed over to it lasts.
        """
        offer = Offer(worker_id, frozenset(task_types), limit, lease_ttl)
        if not self.closed:
            for task_type in offer.task_types:
                self._open.setdefault(task_type, {})[offer] = None
        return offer

    def reserve(self, task_types: Sequence[str]) -> list[Offer | None]:
        """Reserve an open offer for each task of a batch, in order, while any has room.

        Returns the offer per task (None: no poll waits for it). Each reserved offer is
        owed a `settle` with that batch's statement rows.
        """
        chosen: list[Offer | None] = [None] * len(task_types)
        if not self._open:
            return chosen
        reserved: list[Offer] = []
        for index, task_type in enumerate(task_types):
            for offer in self._open.get(task_type, ()):
                if offer.reserved < offer.limit:
                    if offer.reserved == 0:
                        reserved.append(offer)
                        self._unsettled += 1
                        self._quiet.clear()
                    offer.reserved += 1
                    chosen[index] = offer
                    break
        # A reserved offer takes no more tasks from other enqueues: its rows are pending.
        for offer in reserved:
            self._withdraw(offer)
        return chosen

    def _withdraw(self, offer: Offer) -> None:
        for task_type in offer.task_types:
            waiting = self._open.get(task_type)
            if waiting is not None:
                waiting.pop(offer, None)
                if not waiting:
                    del self._open[task_type]

    def settle(self, chosen: Sequence[Offer | None], rows: Sequence[Any]) -> None:
        """Deliver each reserved offer the rows its enqueue's statement leased to it.

        `rows` has one row per task (None for a position that can have no lease); a row
        whose `leased` is false was queued, and its poll, woken, claims as usual.
        """
        leased: dict[Offer, list[Any]] = {}
        for offer, row in zip(chosen, rows, strict=True):
            if offer is None:
                continue
            mine = leased.setdefault(offer, [])
            if row is not None and row["leased"]:
                mine.append(row)
        for offer, mine in leased.items():
            self._deliver(offer, mine)

    def settle_unknown(
        self, chosen: Sequence[Offer | None], task_ids: Sequence[str], lease_ids: Sequence[Any]
    ) -> None:
        """Settle after a statement that raised: it may or may not have committed.

        Every offered task is handed back by its lease id, which fencing makes a no-op for
        a task that was never leased, and every poll gets nothing.
        """
        undecided: dict[Offer, list[Any]] = {}
        for offer, task_id, lease_id in zip(chosen, task_ids, lease_ids, strict=True):
            if offer is not None:
                undecided.setdefault(offer, []).append({"id": task_id, "lease_id": lease_id})
        for offer, rows in undecided.items():
            self.hand_back(rows, offer.worker_id, STATEMENT_FAILED)
            self._deliver(offer, [])

    def _deliver(self, offer: Offer, rows: list[Any]) -> None:
        self._unsettled -= 1
        if offer.abandoned or offer.delivered.done():
            # The poll's call is gone (a done future here was cancelled with it).
            if rows:
                self.hand_back(rows, offer.worker_id, POLL_ENDED)
        else:
            offer.delivered.set_result(rows)
        self._check_quiet()

    def close(self, offer: Offer, *, abandon: bool = False) -> asyncio.Future[list[Any]] | None:
        """Withdraw an offer; its pending delivery if an enqueue has reserved it.

        With `abandon` (the poll's or the stream's call is gone) a pending delivery is
        handed back when it arrives, and None is returned. Await a returned delivery through
        asyncio.shield: it is the offer's own future, and a cancelled wait must not cancel
        it.
        """
        if offer.reserved == 0:
            self._withdraw(offer)
            return None
        delivered = offer.delivered
        if not abandon:
            return delivered
        offer.abandoned = True
        if delivered.done() and not delivered.cancelled() and delivered.result():
            self.hand_back(delivered.result(), offer.worker_id, POLL_ENDED)
        return None

    def close_all(self) -> None:
        """Take no more offers (the server is draining); reserved ones still settle."""
        self.closed = True
        self._open.clear()

    async def handed_back(self, timeout: float) -> None:
        """Until every reserved offer is settled and every hand-back has finished.

        A stopping server waits for this (at most `timeout` seconds) before it closes its
        database pool: a hand-back needs a connection, and a lease that is not handed back
        is only recovered when it expires, at the cost of an attempt.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._unsettled or self._releasing:
                    if self._releasing:
                        # Not gather(): when the timeout ends the wait, gather cancelled
                        # the hand-backs it waited for, half way through their leases.
                        await asyncio.wait(set(self._releasing))
                    else:
                        self._quiet.clear()
                        await self._quiet.wait()

    def _check_quiet(self) -> None:
        if not self._unsettled and not self._releasing:
            self._quiet.set()

    def hand_back(self, rows: list[Any], worker_id: str, reason: str) -> None:
        """Release leases that never reached their worker, in the background.

        Tracked: a stopping server waits for it (`handed_back`) before closing its pool.
        The Work streams hand back through here too.
        """
        self.track(asyncio.ensure_future(self._release(rows, worker_id, reason)))

    def track(self, hand_back: asyncio.Task[None]) -> None:
        """A hand-back run elsewhere (a cancelled long poll's claim), waited for likewise.

        Untracked, a stopping server closed its pool under it: the release failed, and the
        leases, never delivered, waited for their expiry at the cost of an attempt.
        """
        self._releasing.add(hand_back)
        hand_back.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        self._check_quiet()
        if not task.cancelled() and task.exception() is not None:
            # The leases then expire and the reaper requeues them, at the cost of the
            # attempt: late, not lost.
            log.warning(
                "could not hand back undelivered leases: %s",
                task.exception(),
                extra={"event": "handoff_release_failed"},
            )
