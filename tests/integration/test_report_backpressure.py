"""A worker whose reports cannot get through stops leasing, after a bounded number of tasks.

Reports are stalled for real: a trigger makes the server's success update wait for an
advisory lock the test holds, while claims go through. The worker may keep two slot-fulls
of outcomes in delivery (one reporting while the next runs), and then leases no more.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
from helpers import running, wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker

TYPE = "backpressure.job"
LOCK_KEY = 4242
CONCURRENCY = 2
REPORTING_LIMIT = 2 * CONCURRENCY
STALL_SQL = f"""
CREATE FUNCTION backpressure_stall() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({LOCK_KEY});
    RETURN NEW;
END $$;
CREATE TRIGGER backpressure_stall BEFORE UPDATE ON conveyor_tasks FOR EACH ROW
    WHEN (NEW.state = 'succeeded' AND NEW.type = '{TYPE}')
    EXECUTE FUNCTION backpressure_stall();
"""


@contextmanager
def advisory_lock_held(url: str) -> Iterator[None]:
    """Hold the exclusive advisory lock on a connection of its own until the block ends."""
    locked = threading.Event()
    release = threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
            locked.set()
            await asyncio.to_thread(release.wait, 60)
        finally:
            await conn.close()  # ends the session, and with it the lock

    holder = threading.Thread(target=asyncio.run, args=(hold(),))
    holder.start()
    assert locked.wait(10), "could not take the advisory lock"
    try:
        yield
    finally:
        release.set()
        holder.join(10)


def test_a_worker_whose_reports_stall_stops_leasing_after_two_slot_fulls(server, db) -> None:
    db.execute(STALL_SQL)

    def count(state: str) -> int:
        return db.fetchval(
            "SELECT count(*) FROM conveyor_tasks WHERE type = $1 AND state = $2", TYPE, state
        )

    worker = Worker(server.address, concurrency=CONCURRENCY)

    @worker.handler(TYPE)
    async def quick(_ctx, _payload: bytes) -> None:
        return None

    with Client(server.address) as client, running(worker):
        with advisory_lock_held(db.url):
            ids = [client.enqueue_task(Task(type=TYPE)) for _ in range(10)]
            wait_for(
                lambda: count("running") >= REPORTING_LIMIT,
                what=f"{REPORTING_LIMIT} tasks leased while their reports stall",
            )
            # An invariant over a window, not a wait: however long the reports stall, the
            # worker takes no more. (The last lease before the limit may ask for every
            # free slot, hence up to one slot-full less one beyond it.)
            window_end = time.monotonic() + 1.5
            while time.monotonic() < window_end:
                held = count("running")
                assert REPORTING_LIMIT <= held <= REPORTING_LIMIT + CONCURRENCY - 1
                assert count("queued") == len(ids) - held
        # The lock is gone: the stalled reports commit, and the worker takes the rest.
        for task_id in ids:
            assert wait_final(client, task_id).state == TaskState.SUCCEEDED
