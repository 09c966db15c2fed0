"""A stopping server hands back what a long poll claimed for a call that is gone.

A long poll's claim is shielded: when its LeaseTasks call is cancelled while the claim
statement runs, the server lets the claim finish and hands every lease it took back
(`WorkerService._claim`, `_hand_back_claimed`). The docs promise that "a server that stops
gracefully hands back the leases it had claimed and not delivered", and that a stopping
server waits (up to shutdown_grace) for the hand-backs before it closes its pool. Two
reviews found ways the pool was closed under that hand-back, the release failed, and the
leases (never delivered) were left to expire, each at the cost of an attempt:

- the worker's call went away first: the hand-back did not go through the handoff desk,
  so the stop did not wait for it (now `HandoffDesk.track`);
- the server's own stop cancelled the call: gRPC's stop returns before the handlers it
  cancelled have unwound, so the hand-back started after the stop's wait for hand-backs
  (now the stop waits for the claims in flight, as it waits for the Work streams:
  `WorkerService.calls_unwound`).

Real server, real PostgreSQL. The claim is held behind a table lock, lifted as soon as the
stop either waits for hand-backs in flight (what a server that knows of this one does) or
reaches the database's close (what one that does not does): hooks, no sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
from google.protobuf.duration_pb2 import Duration
from helpers import async_wait_for

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.storage import queries
from conveyor.types import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT

WORKER = "claim-at-stop"
TASK_TYPE = "claim.at-stop"
LOCK = "LOCK TABLE conveyor_tasks IN SHARE MODE"
CLAIM_STATEMENT = queries.SQL["task_claim"][:200]


@dataclass
class HeldClaim:
    """A long poll whose claim waits behind the test's lock, on a server about to stop."""

    server: Any
    call: grpc.Future
    ids: list[str]
    watcher: asyncpg.Connection
    blocker: asyncpg.Connection
    stop_waits_for_a_hand_back: threading.Event
    pool_closing: threading.Event

    async def stop_the_server_then_let_the_claim_commit(self) -> None:
        stopping = asyncio.get_running_loop().run_in_executor(None, self.server.stop)
        await async_wait_for(
            lambda: self.stop_waits_for_a_hand_back.is_set() or self.pool_closing.is_set(),
            what="the stop waiting for hand-backs, or closing the database",
        )
        await self.blocker.execute("ROLLBACK")
        await asyncio.wait_for(stopping, 60)

    async def stranded(self) -> dict[str, tuple[str, int]]:
        """The claimed tasks not queued again with their attempt unspent."""
        rows = await self.watcher.fetch(
            "SELECT id::text AS id, state::text AS state, attempt FROM conveyor_tasks"
            " WHERE id = ANY($1::uuid[])",
            self.ids,
        )
        states = {row["id"]: (row["state"], row["attempt"]) for row in rows}
        return {task_id: s for task_id, s in states.items() if s != ("queued", 0)}


@asynccontextmanager
async def held_claim(server: Any, database_url: str) -> AsyncIterator[HeldClaim]:
    app = server.server
    desk = app.worker_service.handoff
    waits, closing = threading.Event(), threading.Event()
    handed_back, close = desk.handed_back, app.database.close

    async def noting_wait(timeout: float) -> None:
        if desk._releasing or desk._unsettled:
            waits.set()
        await handed_back(timeout)

    async def noting_close() -> None:
        closing.set()
        await close()

    desk.handed_back = noting_wait
    app.database.close = noting_close
    ids = [str(uuid.uuid4()) for _ in range(3)]
    watcher = await asyncpg.connect(database_url)
    blocker = await asyncpg.connect(database_url)
    channel = grpc.insecure_channel(server.address)
    try:
        await queries.task_insert_many(
            watcher,
            [queries.NewTask(i, TASK_TYPE, b"", DEFAULT_TIMEOUT, DEFAULT_MAX_RETRIES) for i in ids],
        )
        await blocker.execute(f"BEGIN; {LOCK}")
        call = pb_grpc.WorkerServiceStub(channel).LeaseTasks.future(
            pb.LeaseTasksRequest(
                worker_id=WORKER, task_types=[TASK_TYPE], max_tasks=len(ids), wait=Duration()
            ),
            timeout=60,
        )
        await async_wait_for(
            lambda: watcher.fetchval(
                "SELECT count(*) > 0 FROM pg_stat_activity"
                " WHERE $1 = ANY(pg_blocking_pids(pid)) AND starts_with(query, $2)",
                blocker.get_server_pid(),
                CLAIM_STATEMENT,
            ),
            what="the claim waiting for the lock",
        )
        yield HeldClaim(server, call, ids, watcher, blocker, waits, closing)
    finally:
        channel.close()
        await blocker.close()
        await watcher.close()


async def test_a_claim_whose_poll_went_away_is_handed_back_by_a_stopping_server(
    start_server: Any, database_url: str
) -> None:
    server = start_server(shutdown_grace=timedelta(seconds=2))
    service = server.server.worker_service
    handing_back = threading.Event()
    hand_back_claimed = service._hand_back_claimed

    async def noting_hand_back(claim: Any, worker_id: str) -> None:
        handing_back.set()
        await hand_back_claimed(claim, worker_id)

    service._hand_back_claimed = noting_hand_back
    async with held_claim(server, database_url) as held:
        # The worker goes away (it stops, or its deadline passes) while the claim runs,
        # and the server stops meanwhile (a rolling restart).
        held.call.cancel()
        await async_wait_for(handing_back.is_set, what="the cancelled claim's hand-back")
        await held.stop_the_server_then_let_the_claim_commit()
        stranded = await held.stranded()
    assert not stranded, (
        "leases claimed for a LeaseTasks call that went away were never delivered and "
        f"never handed back by the stopping server (state, attempt): {stranded}"
    )


async def test_a_claim_whose_poll_the_stop_cancelled_is_handed_back(
    start_server: Any, database_url: str
) -> None:
    server = start_server(shutdown_grace=timedelta(seconds=1))
    app = server.server
    # Without hooks the call's cancellation reaches `_claim` after the stop's wait for
    # hand-backs in most runs (the order of gRPC's poller and the shutdown is not fixed).
    # Made deterministic: it reaches `_claim` once gRPC's stop has returned.
    grpc_stopped = asyncio.Event()  # used on the server's loop only
    stop_grpc, claim = app._stop_grpc, app.worker_service._claim

    async def noting_grpc_stop() -> None:
        try:
            await stop_grpc()
        finally:
            grpc_stopped.set()

    async def claim_cancelled_late(worker_id: str, task_types: list[str], limit: int) -> Any:
        inner = asyncio.ensure_future(claim(worker_id, task_types, limit))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            await grpc_stopped.wait()
            inner.cancel()
            await asyncio.wait({inner})
            raise

    app._stop_grpc = noting_grpc_stop
    app.worker_service._claim = claim_cancelled_late
    async with held_claim(server, database_url) as held:
        # The server stops (a rolling restart) while the poll's claim runs: its grace
        # runs out and gRPC cancels the call.
        await held.stop_the_server_then_let_the_claim_commit()
        held.call.cancel()
        stranded = await held.stranded()
    assert not stranded, (
        "leases claimed for a LeaseTasks call the server's stop cancelled were never "
        f"delivered and never handed back (state, attempt): {stranded}"
    )
