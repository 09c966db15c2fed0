"""WakeRounds: after a wake-up, waiting long polls claim one after another, not all at once.

A notification ("tasks may be available") wakes every `LeaseTasks` call waiting in this
server. If each ran its claim at once, one new task would cost as many claim statements as
there are waiting workers, all but one finding nothing: with 50 idle workers, 50 claims per
enqueue, a storm that grows with the fleet. Instead the woken calls take turns, and a round
remembers which task types a claim found empty:

- a claim that got fewer tasks than it asked for has seen every claimable task of its types
  (as of that claim), so those types are *drained* for the rest of the round; unless it
  stopped at the bytes its reply can carry (`task_claim`'s `more`), having left tasks, or
  it found ready tasks locked by another claim (`held`), which may not take them;
- a woken call whose types are all drained goes back to waiting without a statement;
- any other woken call claims in its turn (a full batch means more may remain, so the next
  call claims too).

A round is one notifier generation: a newer wake-up (new tasks committed after the drained
claims looked) starts a fresh round with nothing drained, so no task is left waiting for a
wake-up that was skipped. A long poll's first claim is skipped too when the current round
has already drained its types (a worker polls again as soon as it receives its leases, and
that claim would find nothing), unless the same worker's previous claim said `more`: the
tasks it left were locked until it committed, and a concurrent claim that skipped them and
leased others may have marked their types drained (`WorkerService.lease`). Otherwise it
claims directly, as do the fallback polls (`poll_interval`), which cover tasks that became
available without a wake-up. A claim that leased nothing though ready tasks were locked by
another claim (`held`) never marks its types drained: the other claim may leave them (it
stopped at its reply's bytes, or it serves several types and took older tasks of another),
and the poll claims again within milliseconds (`WorkerService.lease`). Only a claim that
leased nothing is probed for `held`; one that leased some and skipped held tasks still
marks its types drained.
The cost is that woken claims in one server run in sequence; they would contend for the
same rows and CPU if run together.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from conveyor.storage.queries import Claim


class WakeRounds:
    """Serialises woken claims in this process and skips those for drained task types."""

    def __init__(self, generation: Callable[[], int]) -> None:
        """`generation` reads the notifier's current generation (one round per value)."""
        self._generation = generation
        self._turn = asyncio.Lock()
        self._round = -1
        self._drained: set[str] = set()

    async def claim(
        self,
        task_types: Sequence[str],
        limit: int,
        claim: Callable[[], Awaitable[Claim]],
    ) -> tuple[int, Claim | None]:
        """Run `claim` in turn unless its types are drained this round.

        Returns the generation the decision belongs to (wait for a wake-up after it) and
        the claim, or None when it was skipped.
        """
        async with self._turn:
            # Read under the lock: a wake-up that arrived while this call waited for its
            # turn starts a new round, and this call then claims.
            generation = self._generation()
            if generation != self._round:
                self._round = generation
                self._drained = set()
            if self.drained(task_types):
                return generation, None
            claimed = await claim()
            rows = claimed.rows
            if len(rows) < limit and not (rows and rows[0]["more"]) and not claimed.held:
                self._drained.update(task_types)
            return generation, claimed

    def drained(self, task_types: Sequence[str]) -> bool:
        """Whether a claim since the latest wake-up found every one of `task_types` empty."""
        return self._round == self._generation() and self._drained.issuperset(task_types)
