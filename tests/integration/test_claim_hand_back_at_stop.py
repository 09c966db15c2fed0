"""A stopping server waits for the hand-back of a claim whose LeaseTasks call went away.

A long poll's claim is shielded: when the worker's call is cancelled while the claim
statement runs, the server lets the claim finish and hands every lease it took back
(`WorkerService._claim`, `_hand_back_claimed`). The docs promise that "a server that stops
gracefully hands back the leases it had claimed and not delivered", and that a stopping
server waits (up to shutdown_grace) for the hand-backs before it closes its pool. This
hand-back did not go through the handoff desk, so the stop (`_hand_back_undelivered`:
`streams_ended`, then `handoff.handed_back`) did not wait for it: the pool was closed under
it, the release failed, and the leases (never delivered) were left to expire, each at the
cost of an attempt. The desk now tracks it (`HandoffDesk.track`). Found by a review.

Real server, real PostgreSQL. The claim is held behind a table lock; the worker's call is
cancelled; the server is stopped. The lock is lifted as soon as the stop either waits for
hand-backs in flight (the desk's `handed_back` entered with one pending: what a server that
tracks this hand-back does) or reaches the database's close (what this one does): hooks,
no sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
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


async def test_a_claim_whose_poll_went_away_is_handed_back_by_a_stopping_server(
    start_server: Any, database_url: str
) -> None:
    server = start_server(shutdown_grace=timedelta(seconds=2))
    app = server.server
    service = app.worker_service
    ids = [str(uuid.uuid4()) for _ in range(3)]

    watcher = await asyncpg.connect(database_url)
    blocker = await asyncpg.connect(database_url)
    channel = grpc.insecure_channel(server.address)
    try:
        await queries.task_insert_many(
            watcher,
            [queries.NewTask(i, TASK_TYPE, b"", DEFAULT_TIMEOUT, DEFAULT_MAX_RETRIES) for i in ids],
        )

        # Hooks on the server's loop: when the cancelled claim starts handing back, and
        # when the stop reaches the database's close.
        handing_back = threading.Event()
        waiting_for_it = threading.Event()
        closing = threading.Event()
        hand_back_claimed = service._hand_back_claimed
        close = app.database.close
        desk = service.handoff
        handed_back = desk.handed_back

        async def noting_hand_back(claim: Any, worker_id: str) -> None:
            handing_back.set()
            await hand_back_claimed(claim, worker_id)

        async def noting_wait(timeout: float) -> None:
            if desk._releasing or desk._unsettled:
                waiting_for_it.set()
            await handed_back(timeout)

        async def noting_close() -> None:
            closing.set()
            await close()

        service._hand_back_claimed = noting_hand_back
        desk.handed_back = noting_wait
        app.database.close = noting_close

        await blocker.execute(f"BEGIN; {LOCK}")
        workers = pb_grpc.WorkerServiceStub(channel)
        call = workers.LeaseTasks.future(
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
        # The worker goes away (it stops, or its deadline passes) while the claim runs.
        call.cancel()
        await async_wait_for(handing_back.is_set, what="the cancelled claim's hand-back")

        # The server stops meanwhile (a rolling restart).
        stopping = asyncio.get_running_loop().run_in_executor(None, server.stop)
        await async_wait_for(
            lambda: waiting_for_it.is_set() or closing.is_set(),
            what="the stop waiting for hand-backs, or closing the database",
        )
        # The claim can commit now.
        await blocker.execute("ROLLBACK")
        await asyncio.wait_for(stopping, 60)

        rows = await watcher.fetch(
            "SELECT id::text AS id, state::text AS state, attempt FROM conveyor_tasks"
            " WHERE id = ANY($1::uuid[]) ORDER BY id",
            ids,
        )
        states = {row["id"]: (row["state"], row["attempt"]) for row in rows}
        stranded = {task_id: s for task_id, s in states.items() if s != ("queued", 0)}
        assert not stranded, (
            "leases claimed for a LeaseTasks call that went away were never delivered and "
            f"never handed back by the stopping server (state, attempt): {stranded}"
        )
    finally:
        channel.close()
        await blocker.close()
        await watcher.close()
