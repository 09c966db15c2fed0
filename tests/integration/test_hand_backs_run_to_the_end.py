"""Leases the server could not deliver are all handed back, and counted, whatever cancels what.

A claim whose call is cancelled (the worker went away) hands back what it leased: queued
again at once, attempt unspent, counted `released`. The server stopping cancels the call
again: the hand-back used to stop there, between two leases, and the others waited for
their lease to expire (30 s), each at the cost of an attempt. A stopping server also waits
for the handoff desk's hand-backs, and used to cancel them when its wait ran out. An
enqueue that leases its task to a waiting poll delivers that lease however often its write
is cancelled.

Real server, real PostgreSQL. Each test holds the hand-back's statements behind a lock on
the task table, cancels (or gives up waiting) while they wait, lifts the lock, and reads
the tasks, their history and the server's counters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest
from helpers import async_wait_for, enqueue_and_claim, metric_samples

from conveyor.server.handoff import POLL_ENDED
from conveyor.server.worker_service import WORKER_WENT_AWAY
from conveyor.storage import queries
from conveyor.types import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT

WORKER = "hand-back-worker"
LOCK = "LOCK TABLE conveyor_tasks IN SHARE MODE"
# How task_claim's and task_release's statements begin, as pg_stat_activity shows them
# (it keeps their first kilobyte).
CLAIM_STATEMENT = queries.SQL["task_claim"][:200]
RELEASE_STATEMENT = queries.SQL["task_release"][:200]
HANDOFF_STATEMENT = queries.SQL["task_insert_leasing"][:200]
# Under the lease's 30 s: a lease that expired is not what these tests look for.
HAND_BACK_TIMEOUT = 10.0

Result = TypeVar("Result")


def on_server(server: Any, work: Callable[[], Awaitable[Result]]) -> Awaitable[Result]:
    """`work()` run on the server's event loop, awaited from the test's."""

    async def run() -> Result:
        return await work()

    return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), server.loop))


def cancel(server: Any, task: asyncio.Task[Any], times: int) -> Awaitable[None]:
    """Cancel `task` on the server's loop `times` times, each once it has taken the one
    before (its wake-up runs first: it was scheduled when the previous one was delivered).
    Done once the last has been taken too."""
    taken: concurrent.futures.Future[None] = concurrent.futures.Future()

    def again(left: int) -> None:
        if left == 0:
            taken.set_result(None)
            return
        task.cancel()
        server.loop.call_soon(again, left - 1)

    server.loop.call_soon_threadsafe(again, times)
    return asyncio.wrap_future(taken)


async def waiting_behind(watcher: asyncpg.Connection, pid: int, statement: str) -> bool:
    """Whether a session waits for a lock that session `pid` holds or waits for ahead of it,
    running a statement that begins with `statement`."""
    return bool(
        await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE $1 = ANY(pg_blocking_pids(pid)) AND starts_with(query, $2)",
            pid,
            statement,
        )
    )


async def handed_back(watcher: asyncpg.Connection, ids: list[str], reason: str) -> bool:
    """Whether every task is queued again, its attempt unspent, with one `released` event."""
    released = await watcher.fetchval(
        "SELECT count(*) FROM conveyor_tasks AS t"
        " WHERE t.id = ANY($1::uuid[]) AND t.state = 'queued' AND t.attempt = 0"
        " AND (SELECT count(*) FROM conveyor_task_history AS h"
        "      WHERE h.task_id = t.id AND h.event = 'released' AND h.detail = $2) = 1",
        ids,
        reason,
    )
    return bool(released == len(ids))


def released_count(server: Any, task_type: str) -> float:
    """conveyor_task_outcomes_total{type=task_type, outcome="released"}."""
    return sum(
        sample.value
        for sample in metric_samples(server.http_url)
        if sample.name == "conveyor_task_outcomes_total"
        and sample.labels == {"type": task_type, "outcome": "released"}
    )


class Sessions:
    """Connections of the test's own: `blocker` and `second` take the lock, `watcher` looks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: list[asyncpg.Connection] = []

    async def open(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.url)
        self.opened.append(conn)
        return conn


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[Sessions]:
    opened = Sessions(database_url)
    yield opened
    for conn in opened.opened:
        await conn.close()


async def test_a_claim_cancelled_again_while_it_hands_back_releases_every_lease(
    server: Any, sessions: Sessions
) -> None:
    task_type = "hand-back.claim"
    ids = [str(uuid.uuid4()) for _ in range(3)]
    watcher = await sessions.open()
    await queries.task_insert_many(
        watcher,
        [queries.NewTask(i, task_type, b"", DEFAULT_TIMEOUT, DEFAULT_MAX_RETRIES) for i in ids],
    )
    service = server.server.worker_service
    blocker = await sessions.open()
    await blocker.execute(f"BEGIN; {LOCK}")

    async def start_poll() -> asyncio.Task[list[Any]]:
        return asyncio.ensure_future(service.lease(WORKER, [task_type], len(ids), give_up_at=0))

    poll = await on_server(server, start_poll)
    await async_wait_for(
        lambda: waiting_behind(watcher, blocker.get_server_pid(), CLAIM_STATEMENT),
        what="the claim waiting for the lock",
    )
    # The worker goes away: the claim goes on, shielded, to be handed back.
    await cancel(server, poll, times=1)
    # A second lock, asked for now, queues behind the claim: granted once the claim has
    # committed, it holds the hand-back's first statement.
    second = await sessions.open()
    await second.execute("BEGIN")
    second_lock = asyncio.ensure_future(second.execute(LOCK))
    await async_wait_for(
        lambda: watcher.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
            second.get_server_pid(),
        ),
        what="the second lock queued behind the claim",
    )
    await blocker.execute("ROLLBACK")
    await second_lock
    await async_wait_for(
        lambda: waiting_behind(watcher, second.get_server_pid(), RELEASE_STATEMENT),
        what="the hand-back waiting for the lock",
    )
    # The server stopping cancels the call again, and again, while the hand-back waits.
    await cancel(server, poll, times=3)
    await second.execute("ROLLBACK")

    await async_wait_for(
        lambda: handed_back(watcher, ids, WORKER_WENT_AWAY),
        timeout=HAND_BACK_TIMEOUT,
        what="every lease of the claim handed back",
    )
    await async_wait_for(poll.done, what="the call to end")
    assert poll.cancelled()
    assert released_count(server, task_type) == len(ids)


async def test_a_stopping_server_that_stops_waiting_lets_the_hand_backs_finish(
    server: Any, sessions: Sessions
) -> None:
    """The desk's hand-backs run on when the stopping server's wait for them runs out (the
    database pool waits for them in turn). Used to: the wait cancelled them."""
    task_type = "hand-back.desk"
    watcher = await sessions.open()
    leases = await enqueue_and_claim(
        watcher, task_type, [str(uuid.uuid4()) for _ in range(3)], WORKER
    )
    rows = [{"id": task_id, "lease_id": lease_id} for task_id, lease_id in leases.items()]
    desk = server.server.worker_service.handoff
    blocker = await sessions.open()
    await blocker.execute(f"BEGIN; {LOCK}")

    async def hand_back() -> None:
        desk.hand_back(rows, WORKER, POLL_ENDED)

    await on_server(server, hand_back)
    await async_wait_for(
        lambda: waiting_behind(watcher, blocker.get_server_pid(), RELEASE_STATEMENT),
        what="the hand-back waiting for the lock",
    )
    await on_server(server, lambda: desk.handed_back(0.05))
    await blocker.execute("ROLLBACK")

    await async_wait_for(
        lambda: handed_back(watcher, list(leases), POLL_ENDED),
        timeout=HAND_BACK_TIMEOUT,
        what="every lease handed back",
    )
    assert released_count(server, task_type) == len(leases)


async def test_an_enqueue_cancelled_twice_while_handing_over_still_delivers_its_lease(
    server: Any, sessions: Sessions
) -> None:
    """The insert that leases a new task to a waiting poll runs to its end, and the poll
    gets the lease, however often the write carrying it is cancelled meanwhile. Used to: a
    second cancellation reached the statement, which neither delivered its lease nor
    handed it back, and the poll waited for an answer that never came."""
    task_type = "hand-back.handoff"
    task_id = str(uuid.uuid4())
    watcher = await sessions.open()
    workers = server.server.worker_service
    desk = workers.handoff
    enqueues = server.server.task_service.group_commit

    async def start_poll() -> asyncio.Task[list[Any]]:
        return asyncio.ensure_future(workers.lease(WORKER, [task_type], 1, give_up_at=None))

    poll = await on_server(server, start_poll)
    await async_wait_for(lambda: task_type in desk._open, what="the poll's offer at the desk")
    blocker = await sessions.open()
    await blocker.execute(f"BEGIN; {LOCK}")

    async def start_enqueue() -> asyncio.Future[list[bool]]:
        batch = queries.NewTasks.of(
            [queries.NewTask(task_id, task_type, b"", DEFAULT_TIMEOUT, DEFAULT_MAX_RETRIES)]
        )
        return asyncio.ensure_future(enqueues.submit(batch))

    enqueue = await on_server(server, start_enqueue)
    await async_wait_for(
        lambda: waiting_behind(watcher, blocker.get_server_pid(), HANDOFF_STATEMENT),
        what="the handing-over insert waiting for the lock",
    )
    # The write's own task (the group commit's flush), cancelled as closing the group
    # commit cancels it, and again while the insert still waits.
    (flush,) = enqueues._flushes
    await cancel(server, flush, times=2)
    await blocker.execute("ROLLBACK")

    await async_wait_for(poll.done, timeout=HAND_BACK_TIMEOUT, what="the poll's answer")
    (leased,) = poll.result()
    assert str(leased["id"]) == task_id
    row = await watcher.fetchrow(
        "SELECT state, lease_id, worker_id FROM conveyor_tasks WHERE id = $1", task_id
    )
    assert (row["state"], str(row["lease_id"]), row["worker_id"]) == (
        "running",
        str(leased["lease_id"]),
        WORKER,
    )
    await async_wait_for(lambda: desk._unsettled == 0, what="the desk to be settled")
    await async_wait_for(enqueue.done, what="the enqueue to end")
    assert enqueue.cancelled() or enqueue.exception() is not None
