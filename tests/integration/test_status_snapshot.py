"""A task's status and its own timeline agree.

GetTask with its history read the task row and its history in two statements outside any
transaction, so a change committed in between gave a status whose state contradicted its
own timeline: RUNNING with a history ending in `succeeded` (4 of 5 runs of the load test
below, found by a review). It now reads them from one repeatable-read snapshot, as the
dashboard's task page does (control.task_detail). So does the explanation GetTask
reads when asked, which `conveyor tasks show` prints beside the status.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from helpers import wait_for

from conveyor import Client, Task, TaskState, Worker

if TYPE_CHECKING:
    from collections.abc import Callable


def public(state: str) -> str:
    return TaskState(state).value


def test_status_and_timeline_agree_under_load(server: Any, db: Any) -> None:
    """Natural race: a worker runs many short tasks while a reader polls their status."""
    worker = Worker(server=server.address, concurrency=8)

    def noop(ctx: Any, payload: bytes) -> bytes:
        return payload

    worker.register_handler("snap.noop", noop)
    contradictions: list[str] = []
    with Client(server.address) as client:
        ids = client.enqueue_tasks([Task(type="snap.noop") for _ in range(2000)])
        stop = threading.Event()

        def read() -> None:
            # Follows the front of the queue: reads a task until it is final, then the next,
            # so the reads meet the changes.
            with Client(server.address) as reader:
                index = 0
                while not stop.is_set() and index < len(ids):
                    task_id = ids[index]
                    status = reader.get_task_status(task_id, history=True)
                    if status.state.is_final:
                        index += 1
                    last = status.history[-1]
                    if status.state.value != public(last.state.value):
                        contradictions.append(
                            f"{task_id}: state {status.state.value}, last event {last.event} "
                            f"({last.state.value}), events {[e.event for e in status.history]}"
                        )

        readers = [threading.Thread(target=read) for _ in range(2)]
        for thread in readers:
            thread.start()
        worker.start()
        try:
            wait_for(
                lambda: (
                    db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'succeeded'")
                    == len(ids)
                    or contradictions
                ),
                timeout=120,
                what="the tasks to finish",
            )
        finally:
            stop.set()
            for thread in readers:
                thread.join(30)
            worker.stop()
    assert contradictions == [], contradictions[:5]


def _report_during_a_read(
    server: Any, client: Client, task_type: str, *, held_table: str, read: Callable[[str], Any]
) -> Any:
    """What `read(task_id)` returned while a success report of the task committed.

    The report is the server's own statement (task_succeed), run in a transaction that also
    holds `held_table`: a read that reads the task row first and `held_table` after finds
    its window between the two wide open while the report commits.
    """
    import asyncio  # noqa: PLC0415

    import asyncpg  # noqa: PLC0415
    from google.protobuf.duration_pb2 import Duration  # noqa: PLC0415
    from helpers import worker_stub  # noqa: PLC0415

    from conveyor.protocol.v1 import conveyor_pb2 as pb  # noqa: PLC0415
    from conveyor.storage.queries import SQL  # noqa: PLC0415

    task_id = client.enqueue_task(Task(type=task_type))
    # Lease it as a worker (raw API), keep the lease.
    with worker_stub(server.address) as workers:
        workers.RegisterWorker(
            pb.RegisterWorkerRequest(
                worker_id="w1", host="h", pid=1, task_types=[task_type], concurrency=1
            ),
            timeout=10,
        )
        [lease] = workers.LeaseTasks(
            pb.LeaseTasksRequest(
                worker_id="w1", task_types=[task_type], max_tasks=1, wait=Duration(seconds=5)
            ),
            timeout=15,
        ).leases

    async def report_between(result: dict[str, Any]) -> None:
        conn = await asyncpg.connect(server.config.database_url)
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.execute(f"LOCK TABLE {held_table} IN ACCESS EXCLUSIVE MODE")
            await conn.fetchrow(
                SQL["task_succeed"], uuid.UUID(task_id), uuid.UUID(lease.lease_id), None, "w1"
            )
            # The read reads the task row (not blocked) and then waits for the held table.
            reader = threading.Thread(target=lambda: result.__setitem__("read", read(task_id)))
            reader.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                waiting = await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1::regclass",
                    held_table,
                )
                if waiting:
                    break
                await asyncio.sleep(0.01)
            await tx.commit()
            await asyncio.get_running_loop().run_in_executor(None, reader.join, 15)
        finally:
            await conn.close()

    result: dict[str, Any] = {}
    asyncio.run(report_between(result))
    return result["read"]


def test_status_and_timeline_agree_when_a_change_commits_between_the_reads(
    server: Any, db: Any
) -> None:
    """Deterministic: a success report commits after GetTask read the row, before it read
    the history."""
    with Client(server.address) as client:
        status = _report_during_a_read(
            server,
            client,
            "snap.one",
            held_table="conveyor_task_events",
            read=lambda task_id: client.get_task_status(task_id, history=True),
        )
    events = [(e.event, e.state.value) for e in status.history]
    # Both from before the report (the snapshot of GetTask's first read): before, the
    # status said RUNNING while its own timeline said it had succeeded.
    assert status.state.value == public(status.history[-1].state.value), (
        status.state,
        status.finished_at,
        events,
    )


def test_status_and_explanation_agree_when_a_change_commits_between_the_reads(
    server: Any, db: Any
) -> None:
    """`conveyor tasks show` asked for the status and then the explanation, and said RUNNING
    above "succeeded after 1 attempt(s)" when the task finished between the calls (9 pairs
    in 5,946 of a review's). GetTask now reads the explanation in its own snapshot: here the
    report commits after the row was read, while the explanation waits for a table that
    the report's transaction holds."""
    with Client(server.address) as client:
        status = _report_during_a_read(
            server,
            client,
            "snap.explained",
            held_table="conveyor_paused_types",
            read=lambda task_id: client.get_task_status(task_id, explain=True),
        )
        # Read before the report committed (the window was open), and explained as such.
        assert status.state is TaskState.RUNNING
        assert status.explanation[0].startswith("running attempt 1 of 4 on worker w1"), (
            status.explanation
        )
        after = client.get_task_status(status.id, explain=True)
    assert after.state is TaskState.SUCCEEDED
    assert after.explanation[0].startswith("succeeded after 1 attempt(s)"), after.explanation
