"""`conveyor dev` whose demo worker has one more task type, `demo.crash`, that crashes it.

Run as `python crashing_dev.py dev --grpc-listen ... --http-listen ...` (the arguments of
`conveyor`), for tests/e2e/test_dev.py. The crash is an exit from a callback of the
worker's loop, outside any handler, as in misbehaving_workers.py.
"""

from __future__ import annotations

import asyncio
import sys

from conveyor import TaskContext, Worker
from conveyor.cli import demo_worker
from conveyor.cli.main import main

build_demo_worker = demo_worker.build_demo_worker


async def crash(_ctx: TaskContext, _payload: bytes) -> bytes:
    """End the worker's event loop on an error it cannot handle."""
    asyncio.get_running_loop().stop()  # its run_until_complete then raises RuntimeError
    return b"crash scheduled"


def build_crashable_demo_worker(*, concurrency: int = 4) -> Worker:
    """The demo worker, with `demo.crash` too."""
    worker = build_demo_worker(concurrency=concurrency)
    worker.register_handler("demo.crash", crash)
    return worker


if __name__ == "__main__":
    demo_worker.build_demo_worker = build_crashable_demo_worker
    sys.argv[0] = "conveyor"
    main()
