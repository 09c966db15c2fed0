"""PgQueuer 1.6 peer: asyncpg, the schema installed from Python, workers started from Python.

Workers: ``WORKER_PROCESSES`` processes (peers/common.py), each a ``QueueManager`` run as
``pgq run`` runs it (``pgqueuer.run`` on uvloop, its defaults: batch size 10, no concurrency
limit). They are started from Python rather than through ``pgq run``, whose log-level option
breaks with typer 0.29.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # This file shadows the `pgqueuer` package when run as a script: import from benchmarks/.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

# Logged tables, as every system here is durable: an inherited PGQUEUER_DURABILITY (or its
# legacy spelling DURABILITY) of volatile or balanced would make some UNLOGGED. Set before
# pgqueuer reads its settings; the workers inherit it.
os.environ["PGQUEUER_DURABILITY"] = "durable"
os.environ.pop("DURABILITY", None)

import asyncio
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import asyncpg
import uvloop
from peers import common
from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, Queries, QueueManager, run

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator

    from pgqueuer import Job

ENTRYPOINT = "noop"
BATCH_SIZE = 10  # `pgq run --batch-size` default


# --- Worker ------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """One worker process."""

    @asynccontextmanager
    async def factory() -> AsyncIterator[QueueManager]:
        connection = await asyncpg.connect(args.pg_url)
        try:
            qm = QueueManager(Queries(AsyncpgDriver(connection)))

            @qm.entrypoint(ENTRYPOINT)
            async def noop(job: Job) -> None:
                started = time.time()
                task_id = int(job.payload or b"0")
                common.record(task_id, started, time.time())

            yield qm
        finally:
            await connection.close()

    uvloop.run(run(factory, batch_size=BATCH_SIZE))


def start_workers(procs: common.Processes, args: argparse.Namespace) -> None:
    """Start the worker processes."""
    for _ in range(common.WORKER_PROCESSES):
        procs.start(common.self_command(__file__, args))


# --- Benchmark ---------------------------------------------------------------------------


async def enqueue_batch(queries: Queries, ids: list[int]) -> None:
    """One bulk enqueue call."""
    await queries.enqueue([ENTRYPOINT] * len(ids), [str(i).encode() for i in ids], [0] * len(ids))


async def warm_up(queries: Queries, path: Path, procs: common.Processes) -> None:
    """Wait until the workers run tasks (ids below zero, ignored by the w2 result)."""
    await enqueue_batch(queries, list(range(-common.WARM_UP_TASKS, 0)))
    loop = asyncio.get_running_loop()
    done = await loop.run_in_executor(
        None,
        common.wait_for_tasks,
        path,
        common.WARM_UP_TASKS,
        common.WARM_UP_TIMEOUT,
        procs.check_alive,
    )
    if done < common.WARM_UP_TASKS:
        raise RuntimeError("workers did not start")
    await asyncio.sleep(common.WARM_UP_SETTLE)  # let the slower worker reach its LISTEN too


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run one workload."""
    connection = await asyncpg.connect(args.pg_url)
    try:
        queries = Queries(AsyncpgDriver(connection))
        await queries.install()
        workload = args.workload
        if workload == "w1":
            with common.timing_file() as path, common.Processes() as procs:
                for first in range(0, args.tasks, 5000):
                    await enqueue_batch(queries, list(range(first, min(first + 5000, args.tasks))))
                common.log(f"enqueued {args.tasks}; starting workers")
                start_workers(procs, args)
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(
                    None,
                    common.wait_for_tasks,
                    path,
                    args.tasks,
                    args.timeout,
                    procs.check_alive,
                )
                return common.w1_result(path, args.tasks)
        if workload == "w2":
            with common.timing_file() as path, common.Processes() as procs:
                start_workers(procs, args)
                await warm_up(queries, path, procs)
                # Open loop: calls overlap, so each needs a connection of its own.
                async with asyncpg.create_pool(
                    args.pg_url, min_size=common.W2_IN_FLIGHT, max_size=common.W2_IN_FLIGHT
                ) as pool:
                    pooled = Queries(AsyncpgPoolDriver(pool))
                    sent = await common.paced_async(
                        args.rate,
                        args.seconds,
                        lambda i: pooled.enqueue(ENTRYPOINT, str(i).encode()),
                    )
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(
                    None,
                    common.wait_for_tasks,
                    path,
                    len(sent.enqueued_at) + common.WARM_UP_TASKS,
                    common.POST_LOAD_WAIT,
                    procs.check_alive,
                )
                return common.w2_result(path, sent)
        if workload == "w3-single":
            return await common.sequential_async(
                args.seconds, lambda i: queries.enqueue(ENTRYPOINT, str(i).encode())
            )
        if workload == "w3-concurrent":
            async with asyncpg.create_pool(
                args.pg_url,
                min_size=common.CONCURRENT_PRODUCERS,
                max_size=common.CONCURRENT_PRODUCERS,
            ) as pool:
                pooled = Queries(AsyncpgPoolDriver(pool))
                return await common.concurrent_async(
                    args.seconds, lambda i: pooled.enqueue(ENTRYPOINT, str(i).encode())
                )
        if workload == "w3-bulk":
            return await common.bulk_async(
                args.seconds, args.batch_size, lambda ids: enqueue_batch(queries, ids)
            )
        raise ValueError(workload)
    finally:
        await connection.close()


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the workload on uvloop, as `pgq run` does."""
    return uvloop.run(asyncio.wait_for(bench(args), args.timeout))


if __name__ == "__main__":
    common.main_wrapper(main, __doc__ or "", worker)
