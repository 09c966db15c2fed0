"""How the server joins concurrent enqueues into one insert (server/task_service.py).

Joined by row count alone, a burst of large enqueues made one statement whose payload
array PostgreSQL could not allocate (over 1 GB for a thousand 1 MiB payloads), and every
caller joined in it failed. Here the server's own weight drives a real GroupCommit whose
write records what each insert would carry.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import timedelta

from conveyor.errors import ServerUnavailable
from conveyor.group_commit import DEFAULT_MAX_WEIGHT, GroupCommit
from conveyor.server.task_service import MAX_JOINED_PAYLOAD_BYTES, enqueue_weight
from conveyor.storage.queries import NewTask, NewTasks

MIB = 1024 * 1024


def one_task(payload_bytes: int) -> NewTasks:
    task = NewTask(str(uuid.uuid4()), "t", b"x" * payload_bytes, timedelta(seconds=60), 3)
    return NewTasks.of([task])


def test_small_tasks_weigh_about_their_rows() -> None:
    assert enqueue_weight(one_task(100)) == 1
    # 100 kB of payloads in all: 7 more, against the 5,000 rows a join may carry.
    assert 1000 <= enqueue_weight(NewTasks.concat([one_task(100)] * 1000)) <= 1010


def test_joined_inserts_of_large_payloads_stay_under_the_byte_bound() -> None:
    writes: list[tuple[int, int]] = []  # (rows, payload bytes) of each insert
    first_began, go_on = asyncio.Event(), asyncio.Event()

    async def write(batch: NewTasks) -> Sequence[bool]:
        writes.append((len(batch), sum(map(len, batch.payloads))))
        first_began.set()
        await go_on.wait()
        return [True] * len(batch)

    async def scenario() -> None:
        commit: GroupCommit[NewTasks, bool] = GroupCommit(
            write,
            combine=NewTasks.concat,
            count=len,
            weigh=enqueue_weight,
            stopped=lambda: ServerUnavailable("stopped"),
            max_in_flight=1,
        )
        first = asyncio.ensure_future(commit.submit(one_task(MIB)))
        await asyncio.wait_for(first_began.wait(), 5)
        # 200 callers of 1 MiB each wait behind the first write: joined by count, all 200
        # went in one insert.
        waiting = [asyncio.ensure_future(commit.submit(one_task(MIB))) for _ in range(200)]
        await asyncio.sleep(0)  # let every caller queue (one loop step, no timing)
        go_on.set()
        await asyncio.wait_for(asyncio.gather(first, *waiting), 10)

    asyncio.run(scenario())
    assert sum(rows for rows, _ in writes) == 201
    assert len(writes) > 2
    assert max(size for _, size in writes) <= MAX_JOINED_PAYLOAD_BYTES + MIB
    assert max(rows for rows, _ in writes) <= DEFAULT_MAX_WEIGHT
