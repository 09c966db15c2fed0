"""Celery 5.7 peer: Redis broker, ``task_acks_late=True``, no result backend.

Workers: one ``celery worker`` with the prefork pool and concurrency ``WORKER_PROCESSES``,
prefetch multiplier left at its default (4), gossip, mingle and heartbeats off (they only
slow start-up). Celery has no bulk enqueue (a ``group`` publishes its messages one by one), so
w1 pre-queues with single ``delay`` calls and w3-bulk is unsupported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # This file shadows the `celery` package when run as a script: import from benchmarks/.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import time
from typing import TYPE_CHECKING, Any

from celery import Celery
from peers import common

if TYPE_CHECKING:
    import argparse

REDIS_ENV = "PEER_BENCH_REDIS_URL"
CONCURRENCY = common.WORKER_PROCESSES

app = Celery("peers")
app.conf.update(
    broker_url=os.environ.get(REDIS_ENV, "redis://127.0.0.1:6379/0"),
    task_acks_late=True,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(task_id: int) -> None:
    """The no-op task."""
    started = time.time()
    common.record(task_id, started, time.time())


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run one workload."""
    common.flush_redis(args.redis_url)
    app.conf.broker_url = args.redis_url
    # The producer side only: w3-concurrent's producers would otherwise queue for the
    # default pool of 10 broker connections.
    app.conf.broker_pool_limit = common.CONCURRENT_PRODUCERS

    def start_workers(procs: common.Processes) -> None:
        procs.start(
            [
                str(Path(sys.executable).with_name("celery")),
                "--app",
                "peers.celery:app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(CONCURRENCY),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "WARNING",
            ],
            env=common.worker_env({REDIS_ENV: args.redis_url}),
        )

    return common.run_sync_workload(
        args,
        noop.delay,
        start_workers,
        no_bulk_reason="no bulk API (a group publishes its messages one at a time)",
    )


if __name__ == "__main__":
    common.main_wrapper(main, __doc__ or "")
