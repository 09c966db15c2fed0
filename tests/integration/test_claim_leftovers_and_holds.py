"""The claim's `held` probe, and the leftovers of a claim stopped at its reply's bytes.

Real server, real PostgreSQL, raw long polls (tests/long_polls.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg
from helpers import holding, wait_for
from long_polls import Fleet, claims

from conveyor import Client
from conveyor.client.channel import CHANNEL_OPTIONS
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.storage import queries

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import ServerThread

MIB = 1024 * 1024
LONG = timedelta(minutes=10)
# 3 MiB payloads: five fit one reply of a server with a 4 MiB payload limit.
PAYLOAD_BYTES = 3 * MIB


def insert_in_one_commit(database_url: str, tasks: list[queries.NewTask]) -> None:
    """Enqueue `tasks` at statement level in one transaction: one NOTIFY, one wake-up."""

    async def insert() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                assert await queries.task_insert_many(conn, tasks) == [True] * len(tasks)
        finally:
            await conn.close()

    asyncio.run(insert())


def replace_wait(request: pb.LeaseTasksRequest, *, seconds: int) -> pb.LeaseTasksRequest:
    """The same long poll, waiting at most `seconds` on the server."""
    shorter = pb.LeaseTasksRequest()
    shorter.CopyFrom(request)
    shorter.wait.FromTimedelta(timedelta(seconds=seconds))
    return shorter


def test_leftovers_of_a_claim_stopped_at_its_bytes_are_claimed_after_a_partial_claim_drained(
    start_server: Callable[..., ServerThread], database_url: str
) -> None:
    """W1's claim stops at its reply's bytes and leaves task L, locked until it commits.
    Meanwhile another worker's woken claim skips L and leases a newer task N: it got fewer
    than it asked for and is not `held` (it leased something), so it marks the type
    drained. W1 polls again at once for L; its first claim must not be skipped for that
    mark (the 'left more' memory did this; `held` covers only a claim that leased nothing).
    Here L's lock is the test's, held while the other claim runs, as W1's claim holds it.
    """
    server = start_server(
        max_payload_bytes=4 * MIB,
        poll_interval=timedelta(minutes=1),
        handoff=False,
        lease_ttl=LONG,
    )
    kind = "large.partial"
    tasks = [
        queries.NewTask(str(uuid.uuid4()), kind, bytes([n]) * PAYLOAD_BYTES, LONG, 0)
        for n in range(6)
    ]
    insert_in_one_commit(database_url, tasks)
    fleet = Fleet(server.address, options=CHANNEL_OPTIONS)
    try:
        with Client(server.address) as client:
            poll = fleet.register("partial-1", kind, max_tasks=8)
            first = fleet.workers.LeaseTasks(poll, timeout=20)
            assert [lease.task_id for lease in first.leases] == [task.id for task in tasks[:5]]
            leftover = tasks[5].id
            # Keep the second worker's poll waiting (not claiming) until the resume's wake-up.
            assert client.pause_type(kind)
            before = claims(server.http_url).get("empty", 0)
            other = fleet.poll("partial-2", kind, max_tasks=8)
            wait_for(
                lambda: claims(server.http_url).get("empty", 0) > before,
                what="the second poll's first claim (paused: empty)",
            )
            with holding(
                database_url,
                f"SELECT 1 FROM conveyor_tasks WHERE id = '{leftover}' FOR UPDATE",  # noqa: S608 - a uuid
            ):
                newer = fleet.enqueue(kind)
                client.resume_type(kind)
                # Woken: a claim in its turn, which skips the held L and leases N.
                wait_for(other.done, timeout=10, what="the second poll to lease the newer task")
                assert other.result() == [newer]
            # L is free and ready; W1 has room and polls again at once.
            started = time.monotonic()
            again = fleet.workers.LeaseTasks(replace_wait(poll, seconds=8), timeout=20)
            took = time.monotonic() - started
    finally:
        fleet.close()
    assert [lease.task_id for lease in again.leases] == [leftover]
    # A worker with room, a task ready: milliseconds, not the rest of the poll's wait (or,
    # for a Work stream, the fallback poll).
    assert took < 2, (
        f"the leftover waited {took:.1f} s for the poll's last claim (its first was skipped "
        f"for the drained round); claims {claims(server.http_url)}"
    )


def test_polls_under_a_long_lock_claim_at_most_about_20_times_a_second_and_recover_at_once(
    start_server: Callable[..., ServerThread], database_url: str
) -> None:
    """An operator's transaction holds the only ready task locked for 3 s (a bulk cancel in
    progress, a SELECT ... FOR UPDATE in psql). Four polls wait for its type: each claims
    again at most ~20 times a second (HELD_RETRY_MAX_SECONDS), and the task is leased within
    a fraction of a second once the lock is gone. (Measured; nothing covered the rate.)"""
    server = start_server(poll_interval=timedelta(minutes=1), handoff=False, lease_ttl=LONG)
    kind = "held.long"
    fleet = Fleet(server.address, options=CHANNEL_OPTIONS)
    try:
        task_id = fleet.enqueue(kind)
        with holding(
            database_url,
            f"SELECT 1 FROM conveyor_tasks WHERE id = '{task_id}' FOR UPDATE",  # noqa: S608 - a uuid
        ):
            polls = [fleet.poll(f"held-{n}", kind, max_tasks=4) for n in range(4)]
            wait_for(lambda: claims(server.http_url).get("held", 0) >= 4, what="held claims")
            before = claims(server.http_url)
            start = time.monotonic()
            time.sleep(3)  # the measurement window itself
            after = claims(server.http_url)
            window = time.monotonic() - start
        released = time.monotonic()
        wait_for(lambda: any(poll.done() for poll in polls), timeout=5, what="a lease")
        recovered = time.monotonic() - released
        leased = [poll.result() for poll in polls if poll.done()]
    finally:
        fleet.close()
    held_rate = (after.get("held", 0) - before.get("held", 0)) / window / 4
    assert after.get("empty", 0) == before.get("empty", 0), (before, after)
    assert held_rate <= 25, f"{held_rate:.1f} held claims a second per poll"
    assert leased == [[task_id]]
    assert recovered < 0.5, f"the task waited {recovered:.2f} s after the lock went"
