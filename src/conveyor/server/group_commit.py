"""Group commit: concurrent calls that write the same kind of row share one statement.

Each durable write costs a WAL flush before it may be acknowledged; with many producers
enqueuing one task each, or many handlers reporting success at once, those flushes are the
limit. A `GroupCommit` runs one statement at a time per slot (at most `max_in_flight`):
calls that arrive while statements are in flight wait and then go together in the next one
(at most `max_items` items). A lone call runs at once: batching costs latency only when
there is a queue to batch.

Used for enqueues (`task_insert_many`) and for success reports (`task_succeed_many`). Every
call still gets exactly its own rows, in its order, as if it had run alone: the statements
return one row per input item, in input order, and decide duplicates by first occurrence.
A call that runs alone hands its items to the statement as they are; calls that share a
statement are joined by `combine` (by default into one list; enqueues join their column
batches instead, so a bulk call never becomes a thousand objects).
If a statement fails, every call in it fails with the same error; callers retry safely
because both writes are idempotent (an enqueue per task id, a report per lease).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from conveyor.errors import ServerUnavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from conveyor.server.database import Database

DEFAULT_MAX_IN_FLIGHT: Final = 2
DEFAULT_MAX_ITEMS: Final = 5000

Item = TypeVar("Item")


def _concatenated(parts: list[Sequence[Item]]) -> list[Item]:
    return [item for part in parts for item in part]


@dataclass
class _Waiting(Generic[Item]):
    items: Sequence[Item]
    answer: asyncio.Future[list[Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class GroupCommit(Generic[Item]):
    """Coalesces concurrent calls of one statement into shared executions."""

    def __init__(
        self,
        database: Database,
        statement: Callable[[Any, Sequence[Item]], Awaitable[Sequence[Any]]],
        observe_group: Callable[[int], None],
        *,
        combine: Callable[[list[Sequence[Item]]], Sequence[Item]] | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        """`statement(conn, items)` returns one row per item, in order.

        `combine` joins the items of several calls into the items of one statement, in
        order (default: one list).
        """
        self._database = database
        self._statement = statement
        self._observe_group = observe_group
        self._combine = combine or _concatenated
        self._max_in_flight = max_in_flight
        self._max_items = max_items
        self._waiting: list[_Waiting[Item]] = []
        self._in_flight = 0
        # References to the running flushes (asyncio keeps only weak ones).
        self._flushes: set[asyncio.Task[None]] = set()

    async def submit(self, items: Sequence[Item]) -> list[Any]:
        """Write `items` (committed when this returns); their rows, in order."""
        waiting: _Waiting[Item] = _Waiting(items)
        self._waiting.append(waiting)
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            # Its own task: a caller that gives up (cancelled call) must not abandon the
            # statement that carries other callers' items.
            flush = asyncio.get_running_loop().create_task(self._flush())
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        return await asyncio.shield(waiting.answer)

    async def _flush(self) -> None:
        try:
            while self._waiting:
                await self._run(self._take_group())
        except BaseException:
            # Cancelled: the server is stopping, and nothing will write what still waits.
            for waiting in self._waiting:
                if not waiting.answer.done():
                    waiting.answer.set_exception(
                        ServerUnavailable("the server is stopping; retry on another")
                    )
            self._waiting.clear()
            raise
        finally:
            self._in_flight -= 1

    def _take_group(self) -> list[_Waiting[Item]]:
        group: list[_Waiting[Item]] = []
        count = 0
        while self._waiting:
            size = len(self._waiting[0].items)
            if group and count + size > self._max_items:
                break
            group.append(self._waiting.pop(0))
            count += size
        return group

    async def _run(self, group: list[_Waiting[Item]]) -> None:
        items = group[0].items if len(group) == 1 else self._combine([w.items for w in group])
        try:
            async with self._database.connection() as conn:
                rows = await self._statement(conn, items)
        except BaseException as exc:
            for waiting in group:
                if not waiting.answer.done():
                    waiting.answer.set_exception(
                        exc if isinstance(exc, Exception) else ServerUnavailable("stopping")
                    )
            if not isinstance(exc, Exception):
                raise
            return
        self._observe_group(len(group))
        start = 0
        for waiting in group:
            end = start + len(waiting.items)
            if not waiting.answer.done():
                waiting.answer.set_result(list(rows[start:end]))
            start = end
