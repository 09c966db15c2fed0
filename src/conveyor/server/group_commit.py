"""Group commit of enqueues: concurrent EnqueueTasks calls share one INSERT and one commit.

Each enqueue must be durable before it is acknowledged, so each costs a WAL flush; with
many producers sending one task each, those flushes are the limit. Here, calls that arrive
while an insert is in flight wait for it and then go together in the next statement (at
most `max_in_flight` statements run at once, each of at most `max_rows` tasks). A lone
call is inserted at once: batching costs latency only when there is a queue to batch.

Every call still gets exactly its own answer: its tasks' rows, in its order, with
`created` as if it had run alone (the statement keeps the first occurrence of an id, so
two calls racing with the same id see one `true` and one `false`, as they would
sequentially). If the statement fails, every call in it fails with the same error; a
client's retry is safe because enqueue is idempotent per task id.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from conveyor.errors import ServerUnavailable
from conveyor.storage import queries

if TYPE_CHECKING:
    from collections.abc import Sequence

    import asyncpg

    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.database import Database

DEFAULT_MAX_IN_FLIGHT: Final = 2
DEFAULT_MAX_ROWS: Final = 5000


@dataclass
class _Waiting:
    tasks: Sequence[queries.NewTask]
    answer: asyncio.Future[list[asyncpg.Record]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class EnqueueGroupCommit:
    """Coalesces concurrent inserts of new tasks into shared statements."""

    def __init__(
        self,
        database: Database,
        metrics: ServerMetrics,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        """Insert through `database`; record each statement's size in `metrics`."""
        self._database = database
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._max_rows = max_rows
        self._waiting: list[_Waiting] = []
        self._in_flight = 0
        # References to the running flushes (asyncio keeps only weak ones).
        self._flushes: set[asyncio.Task[None]] = set()

    async def insert(self, tasks: Sequence[queries.NewTask]) -> list[asyncpg.Record]:
        """Insert `tasks` (committed when this returns); their (id, created) rows in order."""
        waiting = _Waiting(tasks)
        self._waiting.append(waiting)
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            # Its own task: a caller that gives up (cancelled call) must not abandon the
            # statement that carries other callers' tasks.
            flush = asyncio.get_running_loop().create_task(self._flush())
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        return await asyncio.shield(waiting.answer)

    async def _flush(self) -> None:
        try:
            while self._waiting:
                await self._run(self._take_group())
        except BaseException:
            # Cancelled: the server is stopping, and nothing will insert what still waits.
            for waiting in self._waiting:
                if not waiting.answer.done():
                    waiting.answer.set_exception(
                        ServerUnavailable("the server is stopping; retry on another")
                    )
            self._waiting.clear()
            raise
        finally:
            self._in_flight -= 1

    def _take_group(self) -> list[_Waiting]:
        group: list[_Waiting] = []
        rows = 0
        while self._waiting:
            size = len(self._waiting[0].tasks)
            if group and rows + size > self._max_rows:
                break
            group.append(self._waiting.pop(0))
            rows += size
        return group

    async def _run(self, group: list[_Waiting]) -> None:
        tasks = [task for waiting in group for task in waiting.tasks]
        try:
            async with self._database.connection() as conn:
                rows = await queries.task_insert_many(conn, tasks)
        except BaseException as exc:
            for waiting in group:
                if not waiting.answer.done():
                    waiting.answer.set_exception(
                        exc if isinstance(exc, Exception) else ServerUnavailable("stopping")
                    )
            if not isinstance(exc, Exception):
                raise
            return
        self._metrics.enqueue_group_size.observe(len(group))
        start = 0
        for waiting in group:
            end = start + len(waiting.tasks)
            if not waiting.answer.done():
                waiting.answer.set_result(rows[start:end])
            start = end
