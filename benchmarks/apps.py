"""The no-op worker the benchmarks run: `conveyor worker apps:worker` from benchmarks/."""

from __future__ import annotations

import time

from peers import common

from conveyor import TaskContext, Worker

NOOP_TYPE = "bench.noop"
# W2's task: a no-op that records when it ran, as every peer's task does (peers/common.py).
TIMED_TYPE = "bench.timed"

# The harness sets the concurrency with `conveyor worker --concurrency`.
worker = Worker(concurrency=32)


@worker.handler(NOOP_TYPE)
async def noop(_ctx: TaskContext, _payload: bytes) -> None:
    """Do nothing: the benchmark measures the queue, not the work."""


@worker.handler(TIMED_TYPE)
async def timed(_ctx: TaskContext, payload: bytes) -> None:
    """Do nothing, and record when: W2 measures enqueue -> handler start as the peers do."""
    started = time.time()
    common.record(int(payload), started, time.time())
