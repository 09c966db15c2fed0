"""Procrastinate 3.10 peer: psycopg 3 connector, schema applied from Python.

Workers: ``WORKER_PROCESSES`` processes (peers/common.py), each ``App.run_worker_async`` with
LISTEN/NOTIFY on (the default) and ``concurrency`` WORKER_CONCURRENCY. Bulk enqueue is
``Task.batch_defer_async``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # This file shadows the `procrastinate` package when run as a script: import from benchmarks/.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from peers import common
from procrastinate import App, PsycopgConnector

if TYPE_CHECKING:
    import argparse

    from procrastinate.tasks import Task

# Jobs run at once per worker process: Procrastinate's default, 1. On 2 cores a no-op drains
# faster with it than with 10 (2,000 tasks: 226 vs 127 tasks/s), so the default is kept.
WORKER_CONCURRENCY = 1


def make_app(pg_url: str, pool_size: int | None = None) -> tuple[App, Task[Any, Any, Any]]:
    """The app and its no-op task."""
    kwargs: dict[str, Any] = {"conninfo": pg_url}
    if pool_size is not None:
        kwargs.update(min_size=pool_size, max_size=pool_size)
    app = App(connector=PsycopgConnector(**kwargs))

    @app.task(name="noop")
    async def noop(task_id: int) -> None:
        started = time.time()
        common.record(task_id, started, time.time())

    return app, noop


# --- Worker ------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """One worker process."""
    logging.basicConfig(level=logging.WARNING)
    app, _ = make_app(args.pg_url)

    async def run() -> None:
        async with app.open_async():
            await app.run_worker_async(concurrency=WORKER_CONCURRENCY, install_signal_handlers=True)

    asyncio.run(run())


def start_workers(procs: common.Processes, args: argparse.Namespace) -> None:
    """Start the worker processes."""
    for _ in range(common.WORKER_PROCESSES):
        procs.start(common.self_command(__file__, args))


# --- Benchmark ---------------------------------------------------------------------------


async def wait_for(path: Path, count: int, timeout: float, procs: common.Processes) -> int:
    """common.wait_for_tasks, off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        None, common.wait_for_tasks, path, count, timeout, procs.check_alive
    )


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run one workload."""
    # Calls overlap in w2 (open loop) and w3-concurrent: a connection for each.
    pool_size = {"w2": common.W2_IN_FLIGHT, "w3-concurrent": common.CONCURRENT_PRODUCERS}.get(
        args.workload
    )
    app, noop = make_app(args.pg_url, pool_size)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        workload = args.workload
        if workload == "w1":
            with common.timing_file() as path, common.Processes() as procs:
                for first in range(0, args.tasks, 5000):
                    ids = range(first, min(first + 5000, args.tasks))
                    await noop.batch_defer_async(*({"task_id": i} for i in ids))
                common.log(f"enqueued {args.tasks}; starting workers")
                start_workers(procs, args)
                await wait_for(path, args.tasks, args.timeout, procs)
                return common.w1_result(path, args.tasks)
        if workload == "w2":
            with common.timing_file() as path, common.Processes() as procs:
                start_workers(procs, args)
                warm = range(-common.WARM_UP_TASKS, 0)
                await noop.batch_defer_async(*({"task_id": i} for i in warm))
                ready = await wait_for(path, len(warm), common.WARM_UP_TIMEOUT, procs)
                if ready < len(warm):
                    raise RuntimeError("workers did not start")
                await asyncio.sleep(common.WARM_UP_SETTLE)  # the slower worker's LISTEN too
                sent = await common.paced_async(
                    args.rate, args.seconds, lambda i: noop.defer_async(task_id=i)
                )
                expected = len(sent.enqueued_at) + len(warm)
                await wait_for(path, expected, common.POST_LOAD_WAIT, procs)
                return common.w2_result(path, sent)
        if workload == "w3-single":
            return await common.sequential_async(
                args.seconds, lambda i: noop.defer_async(task_id=i)
            )
        if workload == "w3-concurrent":
            return await common.concurrent_async(
                args.seconds, lambda i: noop.defer_async(task_id=i)
            )
        if workload == "w3-bulk":
            return await common.bulk_async(
                args.seconds,
                args.batch_size,
                lambda ids: noop.batch_defer_async(*({"task_id": i} for i in ids)),
            )
        raise ValueError(workload)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the workload."""
    return asyncio.run(asyncio.wait_for(bench(args), args.timeout))


if __name__ == "__main__":
    common.main_wrapper(main, __doc__ or "", worker)
