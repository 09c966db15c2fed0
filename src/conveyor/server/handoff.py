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
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger("conveyor.server.handoff")


@dataclass(eq=False)
class Offer:
    """One waiting long poll: the tasks it would take, and where they are delivered."""

    worker_id: str
    task_types: frozenset[str]
    limit: int
    # Tasks reserved for it by an enqueue in flight (0 while open).
    reserved: int = 0
    closed: bool = False
    abandoned: bool = False
    delivered: asyncio.Future[list[Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class HandoffDesk:
    """The offers of this server's waiting long polls (all on one event loop)."""

    def __init__(self, release: Callable[[list[Any], str], Awaitable[None]]) -> None:
        """`release(rows, worker_id)` hands back leases their poll can no longer deliver."""
        self._release = release
        # Open offers by task type, each in the order its polls began to wait (dicts as
        # ordered sets): the longest-waiting worker gets the next task, which spreads work
        # over the fleet as the claims' turns do, and a type no poll waits for costs one
        # lookup however many polls wait for other types.
        self._open: dict[str, dict[Offer, None]] = {}
        self._releasing: set[asyncio.Task[None]] = set()
        self.closed = False

    def open(self, worker_id: str, task_types: Sequence[str], limit: int) -> Offer:
        """Leave an offer for a poll about to wait; `close` it when the wait ends."""
        offer = Offer(worker_id, frozenset(task_types), limit)
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

    def settle(self, chosen: Sequence[Offer | None], rows: Sequence[Any] | None) -> None:
        """Deliver each reserved offer the rows leased to it (`rows`: per task, or None).

        `rows` is None when the statement failed: every offer then gets nothing, and its
        poll claims as usual.
        """
        leased: dict[int, list[Any]] = {}
        offers: dict[int, Offer] = {}
        for index, offer in enumerate(chosen):
            if offer is None:
                continue
            offers[id(offer)] = offer
            row = rows[index] if rows is not None else None
            if row is not None and row["leased"]:
                leased.setdefault(id(offer), []).append(row)
        for key, offer in offers.items():
            mine = leased.get(key, [])
            if offer.abandoned:
                if mine:
                    self._hand_back(mine, offer.worker_id)
            elif not offer.delivered.done():
                offer.delivered.set_result(mine)

    def close(self, offer: Offer, *, abandon: bool = False) -> asyncio.Future[list[Any]] | None:
        """Withdraw an offer; its pending delivery if an enqueue has reserved it.

        With `abandon` (the poll's call is gone) a pending delivery is handed back when it
        arrives, and None is returned.
        """
        offer.closed = True
        if offer.reserved == 0:
            self._withdraw(offer)
            return None
        if offer.delivered.done():
            rows = offer.delivered.result()
            if abandon and rows:
                self._hand_back(rows, offer.worker_id)
                return None
            return None if abandon else offer.delivered
        if abandon:
            offer.abandoned = True
            return None
        return offer.delivered

    def close_all(self) -> None:
        """Take no more offers (the server is draining); reserved ones still settle."""
        self.closed = True
        self._open.clear()

    async def handed_back(self) -> None:
        """Until every hand-back started so far has finished (the server stops after it)."""
        while self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    def _hand_back(self, rows: list[Any], worker_id: str) -> None:
        task = asyncio.ensure_future(self._release(rows, worker_id))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The leases then expire and the reaper requeues them: late, not lost.
            log.warning(
                "could not hand back undelivered leases: %s",
                task.exception(),
                extra={"event": "handoff_release_failed"},
            )
