"""Group commit: concurrent calls that write the same kind of thing share one write.

Each durable write costs a WAL flush (and, from a client, a round trip) before it may be
acknowledged; with many producers enqueuing one task each, or many handlers reporting
success at once, those are the limit. A `GroupCommit` runs one write at a time per slot
(at most `max_in_flight`): calls that arrive while writes are in flight wait and then go
together in the next one (up to `max_weight`, by default one unit per row). A lone call
runs at once: batching costs latency only when there is a queue to batch.

Used by the server for enqueues (`task_insert_many`) and success reports
(`task_succeed_many`), and by `AsyncClient` for concurrent enqueues (one `EnqueueTasks`
request for the calls that wait together). Every call still gets exactly its own rows, in
its order, as if it had run alone: the writes return one row per input row, in input
order, and decide duplicates by first occurrence. A call that runs alone hands its batch
to the write as it is; calls that share a write are joined by `combine`.

If a shared write fails, every call in it fails with the same error, unless `split_on`
says the error may concern only some of them (one invalid task among many callers'):
then each call is written again on its own, and gets its own answer. Callers retry safely
because every such write is idempotent (an enqueue per task id, a report per lease).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

DEFAULT_MAX_IN_FLIGHT: Final = 2
DEFAULT_MAX_WEIGHT: Final = 5000

Batch = TypeVar("Batch")
Row = TypeVar("Row")
Item = TypeVar("Item")


def concatenated(parts: list[Sequence[Item]]) -> list[Item]:
    """The `combine` of batches that are plain sequences: one list, in order."""
    return [item for part in parts for item in part]


@dataclass
class _Waiting(Generic[Batch, Row]):
    batch: Batch
    rows: int
    weight: int
    answer: asyncio.Future[list[Row]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class GroupCommit(Generic[Batch, Row]):
    """Coalesces concurrent calls of one write into shared executions."""

    def __init__(
        self,
        write: Callable[[Batch], Awaitable[Sequence[Row]]],
        *,
        combine: Callable[[list[Batch]], Batch],
        count: Callable[[Batch], int],
        stopped: Callable[[], Exception],
        weigh: Callable[[Batch], int] | None = None,
        observe_group: Callable[[int], None] | None = None,
        split_on: Callable[[Exception], bool] | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_weight: int = DEFAULT_MAX_WEIGHT,
    ) -> None:
        """`write(batch)` returns one row per row of `batch` (`count(batch)` of them), in order.

        `combine` joins the batches of several calls into one, in order; `weigh` is a batch's
        share of `max_weight` (default: its row count); `stopped()` is the error for calls
        still waiting when the group commit is cancelled; `observe_group` hears how many
        calls each write carried.
        """
        self._write = write
        self._combine = combine
        self._count = count
        self._stopped = stopped
        self._weigh = weigh or count
        self._observe_group = observe_group
        self._split_on = split_on
        self._max_in_flight = max_in_flight
        self._max_weight = max_weight
        self._waiting: list[_Waiting[Batch, Row]] = []
        self._in_flight = 0
        # References to the running flushes (asyncio keeps only weak ones).
        self._flushes: set[asyncio.Task[None]] = set()

    async def submit(self, batch: Batch) -> list[Row]:
        """Write `batch` (committed when this returns); its rows, in order."""
        waiting: _Waiting[Batch, Row] = _Waiting(batch, self._count(batch), self._weigh(batch))
        self._waiting.append(waiting)
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            # Its own task: a caller that gives up (cancelled call) must not abandon the
            # write that carries other callers' rows.
            flush = asyncio.get_running_loop().create_task(self._flush())
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        try:
            # Not shielded: a caller that gives up cancels only its own answer, which the
            # write then leaves alone (it answers only futures that are not done).
            return await waiting.answer
        except asyncio.CancelledError:
            # Not yet taken into a write: it never will be.
            if waiting in self._waiting:
                self._waiting.remove(waiting)
            raise

    async def close(self) -> None:
        """Cancel the writes in flight; calls still waiting get `stopped()`."""
        flushes = list(self._flushes)
        for flush in flushes:
            flush.cancel()
        await asyncio.gather(*flushes, return_exceptions=True)
        self._fail(self._waiting, self._stopped())
        self._waiting.clear()

    async def _flush(self) -> None:
        try:
            while self._waiting:
                await self._run(self._take_group())
        except BaseException:
            # Cancelled: the owner is stopping, and nothing will write what still waits.
            self._fail(self._waiting, self._stopped())
            self._waiting.clear()
            raise
        finally:
            self._in_flight -= 1

    def _take_group(self) -> list[_Waiting[Batch, Row]]:
        group: list[_Waiting[Batch, Row]] = []
        weight = 0
        while self._waiting:
            if group and weight + self._waiting[0].weight > self._max_weight:
                break
            group.append(self._waiting.pop(0))
            weight += group[-1].weight
        return group

    async def _run(self, group: list[_Waiting[Batch, Row]]) -> None:
        batch = group[0].batch if len(group) == 1 else self._combine([w.batch for w in group])
        try:
            rows = await self._write(batch)
        except Exception as exc:
            if len(group) > 1 and self._split_on is not None and self._split_on(exc):
                for waiting in group:
                    await self._run([waiting])
                return
            self._fail(group, exc)
            return
        except BaseException:
            self._fail(group, self._stopped())
            raise
        if self._observe_group is not None:
            self._observe_group(len(group))
        start = 0
        for waiting in group:
            end = start + waiting.rows
            if not waiting.answer.done():
                waiting.answer.set_result(list(rows[start:end]))
            start = end

    @staticmethod
    def _fail(group: list[_Waiting[Batch, Row]], error: Exception) -> None:
        for waiting in group:
            if not waiting.answer.done():
                waiting.answer.set_exception(error)
