"""Group commit: concurrent calls that write the same kind of thing share one write.

Each durable write costs a WAL flush (and, from a client, a round trip) before it may be
acknowledged; with many producers enqueuing one task each, or many handlers reporting
success at once, those are the limit. A `GroupCommit` runs one write at a time per slot
(at most `max_in_flight`): calls that arrive while writes are in flight wait and then go
together in the next one (up to `max_weight`, by default one unit per row). A lone call
runs at once: batching costs latency only when there is a queue to batch.

Used by the server for enqueues (`task_insert_many`) and success reports
(`task_succeed_many`), and by the clients for concurrent enqueues (one `EnqueueTasks`
request for the calls that wait together): `GroupCommit` for coroutines (`AsyncClient`,
the server), `BlockingGroupCommit` for threads (`Client`), with the same rules. Every call
still gets exactly its own rows, in its order, as if it had run alone: the writes return
one row per input row, in input order, and decide duplicates by first occurrence. A call
that runs alone hands its batch to the write as it is; calls that share a write are joined
by `combine`.

If a shared write fails, every call in it fails with the same error, unless `split_on`
says the error may concern only some of them (one invalid task among many callers'):
then each call is written again on its own, and gets its own answer. Callers retry safely
because every such write is idempotent (an enqueue per task id, a report per lease).
"""

from __future__ import annotations

import asyncio
import copy
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence

DEFAULT_MAX_IN_FLIGHT: Final = 2
DEFAULT_MAX_WEIGHT: Final = 5000
# What one joined write of tasks carries at most, besides its rows: about this many bytes
# of payloads or results. Joined by count alone, a burst of large ones (a thousand of 1 MiB)
# made one statement whose array PostgreSQL could not allocate (1 GB), and every caller in
# it failed. See `rows_and_bytes`.
MAX_JOINED_BYTES: Final = 64 * 1024 * 1024
_BYTES_PER_WEIGHT: Final = MAX_JOINED_BYTES // DEFAULT_MAX_WEIGHT

Batch = TypeVar("Batch")
Row = TypeVar("Row")
Item = TypeVar("Item")


def rows_and_bytes(rows: int, size: int) -> int:
    """A batch's weight: its rows, plus one for every share of MAX_JOINED_BYTES it holds.

    With DEFAULT_MAX_WEIGHT, a joined write then carries at most that many rows and about
    MAX_JOINED_BYTES of data; small tasks weigh about their rows.
    """
    return rows + size // _BYTES_PER_WEIGHT


def concatenated(parts: list[Sequence[Item]]) -> list[Item]:
    """The `combine` of batches that are plain sequences: one list, in order."""
    return [item for part in parts for item in part]


# eq=False: calls are found and removed by identity, never compared by their batches.
@dataclass(eq=False)
class _Call(Generic[Batch, Row]):
    batch: Batch
    rows: int
    weight: int


Call = TypeVar("Call", bound=_Call[Any, Any])


def _take_group(waiting: list[Call], max_weight: int) -> list[Call]:
    """The calls at the head of `waiting` that fit in one write (at least one), removed."""
    group: list[Call] = []
    _move_group(waiting, group, max_weight)
    return group


def _move_group(waiting: list[Call], group: list[Call], max_weight: int) -> None:
    """Move the calls at the head of `waiting` that fit in one write (at least one) to `group`.

    In two steps that each complete or do not start, for a thread that an interrupt
    (KeyboardInterrupt) may stop between any two: a call is always in `waiting` or in
    `group` (at worst in both for a moment), never lost to both, and `group` is what the
    caller settles or puts back.
    """
    count, weight = 0, 0
    for call in waiting:
        if count and weight + call.weight > max_weight:
            break
        count += 1
        weight += call.weight
    group.extend(waiting[:count])
    del waiting[:count]


def _answers(group: list[Call], rows: Sequence[Row]) -> Iterator[tuple[Call, list[Row]]]:
    """Each call of a shared write with its own rows."""
    expected = sum(call.rows for call in group)
    if len(rows) != expected:
        raise RuntimeError(f"the write returned {len(rows)} rows for {expected}")
    start = 0
    for call in group:
        end = start + call.rows
        yield call, list(rows[start:end])
        start = end


def _own(error: Exception) -> Exception:
    """A copy of a shared write's error for one caller, caused by the original.

    Each caller raises its own object: raising one object from several callers would
    rewrite its context and traceback under the others.
    """
    try:
        mine = copy.copy(error)
    except Exception:  # an error that cannot be copied is shared as it is
        return error
    mine.__cause__ = error
    return mine


@dataclass(eq=False)
class _Waiting(_Call[Batch, Row]):
    answer: asyncio.Future[list[Row]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(eq=False)
class _FlushRun:
    """Whether a flush has started (and so will free its own slot)."""

    started: bool = False


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
            run = _FlushRun()
            flush = asyncio.get_running_loop().create_task(self._flush(run))
            self._flushes.add(flush)
            flush.add_done_callback(lambda done: self._flush_done(done, run))
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
        """Cancel the writes in flight; calls still waiting get `stopped()`.

        The group commit can be used again afterwards (a client reopens its channels).
        """
        flushes = list(self._flushes)
        for flush in flushes:
            flush.cancel()
        await asyncio.gather(*flushes, return_exceptions=True)
        self._fail(self._waiting, self._stopped())
        self._waiting.clear()

    def _flush_done(self, flush: asyncio.Task[None], run: _FlushRun) -> None:
        self._flushes.discard(flush)
        if not run.started:
            # Cancelled before it started, it never ran the `finally` that frees its slot.
            # (close() used to reset the count instead, which also zeroed the slot of a
            # flush started by a call made during the close.)
            self._in_flight -= 1

    async def _flush(self, run: _FlushRun) -> None:
        # Its slot is freed in the `finally` below, in the step that ends the flush, not a
        # callback later: a call arriving in between would find no slot and no flush to
        # carry it. Marked on an object of its own, not by its task: under an eager task
        # factory the flush starts before create_task has returned its task.
        run.started = True
        try:
            while self._waiting:
                await self._run(_take_group(self._waiting, self._max_weight))
        except BaseException:
            # Cancelled: the owner is stopping, and nothing will write what still waits.
            self._fail(self._waiting, self._stopped())
            self._waiting.clear()
            raise
        finally:
            self._in_flight -= 1

    async def _run(self, group: list[_Waiting[Batch, Row]]) -> None:
        """Write `group` and answer each of its calls, whatever happens."""
        # A caller cancelled while its group was being taken has nobody to answer.
        group = [waiting for waiting in group if not waiting.answer.done()]
        try:
            if group:
                await self._write_group(group)
        finally:
            # Cancelled half way (a split interrupted): no call may wait for ever.
            unanswered = [waiting for waiting in group if not waiting.answer.done()]
            if unanswered:
                self._fail(unanswered, self._stopped())

    async def _write_group(self, group: list[_Waiting[Batch, Row]]) -> None:
        try:
            batch = group[0].batch if len(group) == 1 else self._combine([w.batch for w in group])
            answers = list(_answers(group, await self._write(batch)))
        except Exception as exc:
            if len(group) > 1 and self._split_on is not None and self._split_on(exc):
                for waiting in group:
                    await self._run([waiting])
                return
            self._fail(group, exc)
            return
        if self._observe_group is not None:
            self._observe_group(len(group))
        for waiting, own_rows in answers:
            if not waiting.answer.done():
                waiting.answer.set_result(own_rows)

    @staticmethod
    def _fail(group: list[_Waiting[Batch, Row]], error: Exception) -> None:
        for index, waiting in enumerate(group):
            if not waiting.answer.done():
                waiting.answer.set_exception(error if index == 0 else _own(error))


@dataclass(eq=False)
class _Blocked(_Call[Batch, Row]):
    # Set for a wake-up (answered, or asked to lead); the fields below say which.
    woken: threading.Event = field(default_factory=threading.Event)
    leads: bool = False
    done: bool = False
    answer: list[Row] = field(default_factory=list)
    error: Exception | None = None


class BlockingGroupCommit(Generic[Batch, Row]):
    """`GroupCommit` for threads: the same rules, with the waiting threads doing the writes.

    There is no flusher thread. A call that finds a slot free leads: it writes groups
    (FIFO, so its own call is among them) until its own call is answered, then passes its
    slot to the oldest call still waiting, which leads in turn. No thread writes for others
    for longer than it takes its own call to go through.
    """

    def __init__(
        self,
        write: Callable[[Batch], Sequence[Row]],
        *,
        combine: Callable[[list[Batch]], Batch],
        count: Callable[[Batch], int],
        weigh: Callable[[Batch], int] | None = None,
        split_on: Callable[[Exception], bool] | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_weight: int = DEFAULT_MAX_WEIGHT,
    ) -> None:
        """The arguments of `GroupCommit`, with a blocking `write`.

        No `stopped`: there is nothing to close, and a write interrupted in its leading
        thread is sent again by the next leader, not failed (`_requeue_unanswered`).
        """
        self._write = write
        self._combine = combine
        self._count = count
        self._weigh = weigh or count
        self._split_on = split_on
        self._max_in_flight = max_in_flight
        self._max_weight = max_weight
        self._lock = threading.Lock()
        self._waiting: list[_Blocked[Batch, Row]] = []
        self._in_flight = 0

    def submit(self, batch: Batch) -> list[Row]:
        """Write `batch` (committed when this returns); its rows, in order."""
        call: _Blocked[Batch, Row] = _Blocked(batch, self._count(batch), self._weigh(batch))
        with self._lock:
            self._waiting.append(call)
            if self._in_flight < self._max_in_flight:
                self._in_flight += 1
                call.leads = True
        try:
            while True:
                if call.leads:
                    # Even when another leader has answered this call meanwhile: leading
                    # (at once) is what hands the slot on.
                    self._lead(call)
                if call.done:
                    break
                # The flags are the truth; the event only wakes this thread to re-read them.
                call.woken.wait()
                call.woken.clear()
        finally:
            if not call.done or call.leads:
                # Interrupted (KeyboardInterrupt) while waiting, or handed the lead then
                # interrupted before leading: leave the queue, and pass any slot on.
                with self._lock:
                    if call in self._waiting:
                        self._waiting.remove(call)
                    if call.leads:
                        call.leads = False
                        self._hand_on_slot()
        if call.error is not None:
            raise call.error
        return call.answer

    def _lead(self, own: _Blocked[Batch, Row]) -> None:
        try:
            while not own.done:
                group: list[_Blocked[Batch, Row]] = []
                try:
                    with self._lock:
                        _move_group(self._waiting, group, self._max_weight)
                    if not group:
                        break  # another leader holds our call: wait for its answer
                    self._write_group(group)
                finally:
                    self._requeue_unanswered(group, own)
        finally:
            with self._lock:
                own.leads = False
                self._hand_on_slot()

    def _requeue_unanswered(
        self, group: list[_Blocked[Batch, Row]], own: _Blocked[Batch, Row]
    ) -> None:
        """Put the other threads' calls of an interrupted write back at the head of the queue.

        A write is interrupted only by what interrupts its leading thread (KeyboardInterrupt),
        most likely while it waits for the answer, with the request already sent: the
        tasks of the other calls in it may well have committed. They were failed with
        ServerUnavailable, and the retry that error invites created the tasks a second
        time under new ids. Now the next leader sends them again, the same tasks, which
        the server creates once. The interrupted thread's own call leaves with it.
        """
        if all(call.done for call in group):
            return  # the common case: the write answered every call
        with self._lock:
            unanswered = [
                call
                for call in group
                if not call.done and call is not own and call not in self._waiting
            ]
            self._waiting[:0] = unanswered

    def _hand_on_slot(self) -> None:
        """Free a slot and give it to the oldest call waiting without one (lock held)."""
        self._in_flight -= 1
        successor = next((call for call in self._waiting if not call.leads), None)
        if successor is not None:
            self._in_flight += 1
            successor.leads = True
            successor.woken.set()

    def _write_group(self, group: list[_Blocked[Batch, Row]]) -> None:
        """Write `group` and answer each of its calls (unless interrupted: `_lead`)."""
        try:
            batch = group[0].batch if len(group) == 1 else self._combine([c.batch for c in group])
            answers = list(_answers(group, self._write(batch)))
        except Exception as exc:
            if len(group) > 1 and self._split_on is not None and self._split_on(exc):
                for call in group:
                    self._write_group([call])
                return
            self._settle(group, error=exc)
            return
        for call, own_rows in answers:
            call.answer = own_rows
            self._settle([call])

    @staticmethod
    def _settle(group: list[_Blocked[Batch, Row]], *, error: Exception | None = None) -> None:
        for index, call in enumerate(group):
            if error is not None:
                call.error = error if index == 0 else _own(error)
            call.done = True
            call.woken.set()
