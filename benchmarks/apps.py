"""The no-op worker the benchmarks run: `conveyor worker apps:worker` from benchmarks/."""

from __future__ import annotations

from conveyor import TaskContext, Worker

NOOP_TYPE = "bench.noop"

# The harness sets the concurrency with `conveyor worker --concurrency`.
worker = Worker(concurrency=32)


@worker.handler(NOOP_TYPE)
async def noop(_ctx: TaskContext, _payload: bytes) -> None:
    """Do nothing: the benchmark measures the queue, not the work."""
