"""How the server joins concurrent enqueues, and concurrent successes, into one statement.

Joined by row count alone, a burst of large enqueues (or of large results) made one
statement whose array PostgreSQL could not allocate (over 1 GB for a thousand 1 MiB
payloads), and every caller joined in it failed; a review found the successes' group
commit still joined that way after the enqueues' had been mended. Here the server's own
weights drive a real GroupCommit whose write records what each statement would carry.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest

from conveyor.errors import ServerUnavailable
from conveyor.group_commit import DEFAULT_MAX_WEIGHT, MAX_JOINED_BYTES, GroupCommit, concatenated
from conveyor.server.task_service import enqueue_weight
from conveyor.server.worker_service import _success_weight
from conveyor.storage.queries import NewTask, NewTasks, Success

MIB = 1024 * 1024


def one_task(payload_bytes: int) -> NewTasks:
    task = NewTask(str(uuid.uuid4()), "t", b"x" * payload_bytes, timedelta(seconds=60), 3)
    return NewTasks.of([task])


def test_small_tasks_weigh_about_their_rows() -> None:
    assert enqueue_weight(one_task(100)) == 1
    # 100 kB of payloads in all: 7 more, against the 5,000 rows a join may carry.
    assert 1000 <= enqueue_weight(NewTasks.concat([one_task(100)] * 1000)) <= 1010


def one_success(result_bytes: int) -> list[Success]:
    return [Success(str(uuid.uuid4()), str(uuid.uuid4()), "w", b"r" * result_bytes)]


def payload_bytes(batch: NewTasks) -> int:
    return sum(map(len, batch.payloads))


def result_bytes(batch: Sequence[Success]) -> int:
    return sum(len(s.result or b"") for s in batch)


@pytest.mark.parametrize(
    ("make", "weigh", "combine", "size_of"),
    [
        (one_task, enqueue_weight, NewTasks.concat, payload_bytes),
        (one_success, _success_weight, concatenated, result_bytes),
    ],
    ids=["enqueues", "successes"],
)
def test_joined_statements_of_large_items_stay_under_the_byte_bound(
    make: Callable[[int], Any],
    weigh: Callable[[Any], int],
    combine: Callable[[list[Any]], Any],
    size_of: Callable[[Any], int],
) -> None:
    writes: list[tuple[int, int]] = []  # (rows, bytes) of each statement
    first_began, go_on = asyncio.Event(), asyncio.Event()

    async def write(batch: Any) -> Sequence[bool]:
        writes.append((len(batch), size_of(batch)))
        first_began.set()
        await go_on.wait()
        return [True] * len(batch)

    async def scenario() -> None:
        commit: GroupCommit[Any, bool] = GroupCommit(
            write,
            combine=combine,
            count=len,
            weigh=weigh,
            stopped=lambda: ServerUnavailable("stopped"),
            max_in_flight=1,
        )
        first = asyncio.ensure_future(commit.submit(make(MIB)))
        await asyncio.wait_for(first_began.wait(), 5)
        # 200 callers of 1 MiB each wait behind the first write: joined by count, all 200
        # went in one statement.
        waiting = [asyncio.ensure_future(commit.submit(make(MIB))) for _ in range(200)]
        await asyncio.sleep(0)  # let every caller queue (one loop step, no timing)
        go_on.set()
        await asyncio.wait_for(asyncio.gather(first, *waiting), 10)

    asyncio.run(scenario())
    assert sum(rows for rows, _ in writes) == 201
    assert len(writes) > 2
    assert max(size for _, size in writes) <= MAX_JOINED_BYTES + MIB
    assert max(rows for rows, _ in writes) <= DEFAULT_MAX_WEIGHT
