"""Leases of large payloads: tasks whose leases together pass the gRPC message limit.

Real server, real PostgreSQL, a real worker (or raw long polls). A claim asks for as many
tasks as the worker has free slots (at most `max_lease_batch`), and a few tasks near the
payload limit add up to more than the server may send in one message. Once, the write
failed and the same claim repeated for ever, with no handler run; then a long poll's claim
took them all and handed back, one `released` event each, what its reply could not carry.
What must hold: every task runs once and succeeds on its first attempt, on the Work stream
and on long polls, and no claim takes a task its message has no room for (the claim stops
at the message's bytes), so no lease goes back to the queue.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from helpers import Db, holding, metric_by_label, wait_final, wait_for
from long_polls import Fleet, claims

from conveyor import Client, Task, TaskState, Worker
from conveyor.client.channel import CHANNEL_OPTIONS
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.server.worker_service import LEASE_BYTES_BESIDES, lease_size_bound
from conveyor.storage import queries

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import ServerThread

MIB = 1024 * 1024
LONG = timedelta(minutes=10)
# Eight 3 MiB payloads: 24 MiB, over the 16 MiB a server with a payload limit of 4 MiB may
# send in one message (five fit), while any one lease fits easily.
PAYLOAD_BYTES = 3 * MIB
TASKS = 8
CONCURRENCY = 10  # room for every task: the first claim asks for them all


def assert_each_wait_observed_once(server: ServerThread, statuses: list[Any]) -> None:
    """One queue-wait observation per task, from its enqueue to the start that ran it."""
    counts = metric_by_label(server.http_url, "conveyor_task_queue_wait_seconds_count", "type")
    sums = metric_by_label(server.http_url, "conveyor_task_queue_wait_seconds_sum", "type")
    assert counts["large"] == TASKS, counts
    waited = sum((s.started_at - s.created_at).total_seconds() for s in statuses)
    assert sums["large"] == pytest.approx(waited, abs=1e-4), (sums, waited)


def run_large_tasks(server: ServerThread) -> list[Any]:
    """Enqueue the tasks, then start a worker (whose first claim asks for all); their final
    states."""
    with Client(server.address) as client:
        ids = client.enqueue_tasks(
            [Task(type="large", payload=bytes([n]) * PAYLOAD_BYTES) for n in range(TASKS)]
        )
        worker = Worker(server.address, concurrency=CONCURRENCY)
        worker.register_handler("large", lambda _ctx, payload: payload[:1])
        worker.start()
        try:
            # Well under a lease's 30 s: a lease lost on the way would fail the wait.
            statuses = [wait_final(client, task_id, timeout=15) for task_id in ids]
        finally:
            worker.stop()
    for n, status in enumerate(statuses):
        assert status.state is TaskState.SUCCEEDED, status
        assert status.attempts == 1, status.history
        assert status.result == bytes([n])
        assert not [event for event in status.history if event.event == "lease_expired"]
    return statuses


@pytest.fixture
def large_payload_server(start_server: Callable[..., ServerThread]) -> Callable[..., ServerThread]:
    def start(*, work_stream: bool) -> ServerThread:
        server = start_server(max_payload_bytes=4 * MIB, work_stream=work_stream)
        assert server.config.max_message_bytes < TASKS * PAYLOAD_BYTES
        return server

    return start


def test_the_work_stream_sends_large_leases_in_several_messages(
    large_payload_server: Callable[..., ServerThread],
) -> None:
    """The stream's claims stop at one message's bytes too (see work_stream.py), so eight
    leases take at least two claims and two messages, and none goes back to the queue."""
    server = large_payload_server(work_stream=True)
    statuses = run_large_tasks(server)
    for status in statuses:
        assert [event.event for event in status.history] == ["enqueued", "started", "succeeded"]
    messages = metric_by_label(server.http_url, "conveyor_work_stream_messages_total", "kind")
    assert messages["leases"] >= 2, messages
    assert_each_wait_observed_once(server, statuses)


def test_a_long_poll_claims_only_what_its_reply_carries(
    large_payload_server: Callable[..., ServerThread],
) -> None:
    """The worker's first poll asks for all eight tasks; its reply carries five. The claim
    takes those five, not eight: the other three wait in the queue for the next poll.
    (Before, the claim took all eight and handed three back, one `released` event each.)"""
    server = large_payload_server(work_stream=False)
    statuses = run_large_tasks(server)
    for status in statuses:
        assert [event.event for event in status.history] == ["enqueued", "started", "succeeded"]
    outcomes = metric_by_label(server.http_url, "conveyor_task_outcomes_total", "outcome")
    # The other outcomes' series start at 0 with the type.
    assert {outcome: n for outcome, n in outcomes.items() if n} == {"succeeded": TASKS}, outcomes
    assert_each_wait_observed_once(server, statuses)


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


def test_a_claim_stopped_by_its_reply_size_leaves_the_rest_to_the_next_woken_poll(
    start_server: Callable[..., ServerThread], database_url: str
) -> None:
    """Two polls wait; six tasks arrive in one commit (one wake-up), and one reply carries
    five. The first woken poll claims five; the second, in its turn, must claim the sixth.
    A claim that gets fewer tasks than it asked for marks its types drained for the round
    (wake_rounds.py), and the second poll would skip its claim and wait for a wake-up that
    never comes (the fallback poll is a minute away). A claim that stopped at its reply's
    size saw more, and must not drain its types."""
    # No lease may expire meanwhile: the reaper's wake-up would start a new round.
    server = start_server(
        max_payload_bytes=4 * MIB,
        poll_interval=timedelta(minutes=1),
        handoff=False,
        lease_ttl=LONG,
    )
    assert 5 * PAYLOAD_BYTES < server.config.lease_message_bytes < 6 * PAYLOAD_BYTES
    fleet = Fleet(server.address, options=CHANNEL_OPTIONS)
    try:
        polls = [fleet.poll(f"large-{n}", "large.rounds", max_tasks=8) for n in range(2)]
        wait_for(
            lambda: claims(server.http_url).get("empty", 0) >= 2,
            what="both polls to make their first, empty claim",
        )
        tasks = [
            queries.NewTask(str(uuid.uuid4()), "large.rounds", bytes([n]) * PAYLOAD_BYTES, LONG, 0)
            for n in range(6)
        ]
        insert_in_one_commit(database_url, tasks)
        # Well within any later wake-up: the workers' sweep (these raw polls never send a
        # heartbeat) and the fallback poll.
        wait_for(
            lambda: all(poll.done() for poll in polls),
            timeout=10,
            what="both polls to answer from the one wake-up",
        )
        leased = sorted((poll.result() for poll in polls), key=len)
    finally:
        fleet.close()
    assert [len(ids) for ids in leased] == [1, 5]
    assert leased[1] + leased[0] == [task.id for task in tasks]  # oldest first
    db = Db(database_url)
    for task in tasks:
        assert [row["event"] for row in db.events(task.id)] == ["enqueued", "started"]


LEFTOVER_LOCKED = (
    "SELECT 1 FROM conveyor_tasks WHERE type = 'large.left' AND state = 'queued' FOR UPDATE"
)


def test_a_claim_that_finds_the_leftovers_held_claims_them_as_soon_as_they_are_free(
    start_server: Callable[..., ServerThread], database_url: str
) -> None:
    """A claim stopped at its reply's bytes leaves tasks (`more`) locked until it commits;
    a concurrent claim of the same type skips them and gets nothing. That claim says its
    tasks were held: it does not mark the type drained for the round (the woken polls would
    skip their claims and the tasks would wait for the fallback poll, a minute here, though
    a worker has room), and its poll claims again within milliseconds, not at the next
    wake-up. The window is held open by the test's own lock on the leftover task, as the
    first claim's lock holds it."""
    server = start_server(
        max_payload_bytes=4 * MIB,
        poll_interval=timedelta(minutes=1),
        handoff=False,
        lease_ttl=LONG,
    )
    assert 5 * PAYLOAD_BYTES < server.config.lease_message_bytes < 6 * PAYLOAD_BYTES
    tasks = [
        queries.NewTask(str(uuid.uuid4()), "large.left", bytes([n]) * PAYLOAD_BYTES, LONG, 0)
        for n in range(6)
    ]
    insert_in_one_commit(database_url, tasks)
    fleet = Fleet(server.address, options=CHANNEL_OPTIONS)
    try:
        poll = fleet.register("left-1", "large.left", max_tasks=8)
        first = fleet.workers.LeaseTasks(poll, timeout=20)
        assert [lease.task_id for lease in first.leases] == [task.id for task in tasks[:5]]
        leftover = tasks[5].id
        # The one task of the type still queued is the leftover.
        with holding(database_url, LEFTOVER_LOCKED):
            before = claims(server.http_url)
            other = fleet.poll("left-2", "large.left", max_tasks=8)
            # A wake-up for another type: the second poll claims in the new round and finds
            # the leftover held again.
            fleet.enqueue("large.elsewhere")
            wait_for(
                lambda: claims(server.http_url).get("held", 0) >= before.get("held", 0) + 3,
                what="the second worker's claims to find the leftover held, again and again",
            )
            assert claims(server.http_url).get("empty", 0) == before.get("empty", 0)
            assert not other.done()
        # Nothing wakes the polls now; the lock is gone and the held claim looks again.
        wait_for(other.done, timeout=5, what="the second poll to lease the leftover")
        assert other.result() == [leftover]
        # The round was never drained: a fresh poll claims (and finds nothing), none skipped.
        skipped = claims(server.http_url).get("skipped", 0)
        again = replace_wait(poll, seconds=1)
        assert list(fleet.workers.LeaseTasks(again, timeout=20).leases) == []
        assert claims(server.http_url).get("skipped", 0) == skipped
    finally:
        fleet.close()


def replace_wait(request: pb.LeaseTasksRequest, *, seconds: int) -> pb.LeaseTasksRequest:
    """The same long poll, waiting at most `seconds` on the server."""
    shorter = pb.LeaseTasksRequest()
    shorter.CopyFrom(request)
    shorter.wait.FromTimedelta(timedelta(seconds=seconds))
    return shorter


@pytest.mark.parametrize(
    ("sizes", "max_bytes", "taken", "more"),
    [
        ([10, 10, 10, 10], 20, 2, True),  # the oldest that fit
        ([10, 10], 20, 2, False),  # all of them fit exactly: nothing left
        ([30, 10], 20, 1, True),  # the oldest alone is too large: it goes anyway
        ([10, 50, 5], 20, 1, True),  # a small task does not pass a large one (FIFO)
        ([10, 50, 5], None, 3, False),  # no bound: the count alone
    ],
)
def test_the_claim_takes_the_oldest_tasks_that_fit_its_bytes(
    database_url: str, sizes: list[int], max_bytes: int | None, taken: int, more: bool
) -> None:
    """task_claim at statement level: a FIFO prefix of the queue whose sizes (payload, no
    trace context, no per-lease bytes here) add up to at most `max_bytes`, never empty when
    a task is ready; `more` says whether it left some behind."""

    async def claim() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url)
        try:
            tasks = [
                queries.NewTask(str(uuid.uuid4()), "sized", b"x" * size, LONG, 0) for size in sizes
            ]
            assert await queries.task_insert_many(conn, tasks) == [True] * len(tasks)
            rows = (
                await queries.task_claim(
                    conn,
                    task_types=["sized"],
                    limit=10,
                    worker_id="w",
                    lease_ttl=LONG,
                    deadline_grace=LONG,
                    max_bytes=max_bytes,
                )
            ).rows
            assert [str(row["id"]) for row in rows] == [task.id for task in tasks[:taken]]
            return rows
        finally:
            await conn.close()

    rows = asyncio.run(claim())
    assert {row["more"] for row in rows} == {more}


@pytest.mark.parametrize(("room", "taken"), [(0, 2), (-1, 1)])
def test_the_claim_counts_a_lease_as_the_server_packs_it(
    database_url: str, room: int, taken: int
) -> None:
    """The claim's estimate of a lease is `lease_size_bound`'s: the payload, the trace
    context's JSON text in bytes (as PostgreSQL writes it: non-ASCII characters unescaped)
    and the bytes besides. Two leases that fit exactly are both taken; one byte less, one."""
    trace = json.dumps({"k": "é" * 10})  # stored as {"k": "éééééééééé"}: 29 bytes
    lease_bytes = 3 + 29 + LEASE_BYTES_BESIDES

    async def claim() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(database_url)
        try:
            tasks = [
                queries.NewTask(str(uuid.uuid4()), "traced", b"abc", LONG, 0, trace)
                for _ in range(2)
            ]
            assert await queries.task_insert_many(conn, tasks) == [True] * len(tasks)
            claimed = await queries.task_claim(
                conn,
                task_types=["traced"],
                limit=10,
                worker_id="w",
                lease_ttl=LONG,
                deadline_grace=LONG,
                max_bytes=2 * lease_bytes + room,
                bytes_per_lease=LEASE_BYTES_BESIDES,
            )
            return claimed.rows
        finally:
            await conn.close()

    rows = asyncio.run(claim())
    assert len(rows) == taken
    assert [lease_size_bound(row) for row in rows] == [lease_bytes] * taken
