"""Dramatiq 2.2 peer: Redis broker, default middleware.

Workers: the ``dramatiq`` CLI with ``WORKER_PROCESSES`` processes x 8 threads (its defaults).
Dramatiq has no bulk enqueue (``group`` sends its messages one by one), so w1 pre-queues
with single ``send`` calls and w3-bulk is unsupported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # This file shadows the `dramatiq` package when run as a script: import from benchmarks/.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import time
from typing import TYPE_CHECKING, Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from peers import common

if TYPE_CHECKING:
    import argparse

REDIS_ENV = "PEER_BENCH_REDIS_URL"
PROCESSES = common.WORKER_PROCESSES
THREADS = 8


def setup(redis_url: str) -> dramatiq.Actor[[int], None]:
    """Install the Redis broker and declare the no-op actor on it."""
    dramatiq.set_broker(RedisBroker(url=redis_url))

    @dramatiq.actor(actor_name="noop", queue_name="default")
    def noop(task_id: int) -> None:
        started = time.time()
        common.record(task_id, started, time.time())

    return noop


if __name__ != "__main__" and REDIS_ENV in os.environ:
    # Imported by the `dramatiq` CLI in a worker process.
    noop = setup(os.environ[REDIS_ENV])


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run one workload."""
    common.flush_redis(args.redis_url)
    actor = setup(args.redis_url)

    def start_workers(procs: common.Processes) -> None:
        procs.start(
            [
                str(Path(sys.executable).with_name("dramatiq")),
                "peers.dramatiq",
                "--processes",
                str(PROCESSES),
                "--threads",
                str(THREADS),
                "--path",
                str(common.BENCHMARKS_DIR),
            ],
            env=common.worker_env({REDIS_ENV: args.redis_url}),
        )

    return common.run_sync_workload(
        args,
        actor.send,
        start_workers,
        no_bulk_reason="no bulk API (group() sends messages one at a time)",
    )


if __name__ == "__main__":
    common.main_wrapper(main, __doc__ or "")
