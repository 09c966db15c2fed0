"""Workers whose handlers misbehave, for the exit-status tests (tests/e2e/test_worker_exits.py).

Run as `conveyor worker misbehaving_workers:exiting` (or `python misbehaving_workers.py
ADDRESS` for the embedded `worker.run()`), with tests/ and tests/e2e/ on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading

from conveyor import TaskContext, Worker

exiting = Worker(concurrency=2)


@exiting.handler("parse")
async def parse(_ctx: TaskContext, payload: bytes) -> bytes:
    """argparse on the payload: a bad one makes it call sys.exit(2) inside the handler."""
    parser = argparse.ArgumentParser(prog="job", exit_on_error=True)
    parser.add_argument("--n", type=int, required=True)
    arguments = parser.parse_args(payload.decode().split())
    return str(arguments.n).encode()


@exiting.handler("crash")
async def crash(_ctx: TaskContext, _payload: bytes) -> bytes:
    """Stop the worker's event loop under it: the worker crashes (a SystemExit no longer does)."""
    asyncio.get_running_loop().stop()  # its run_until_complete then raises RuntimeError
    return b"crash scheduled"


stuck = Worker(concurrency=1, drain_timeout=0.5)


@stuck.handler("stuck")
def hang(_ctx: TaskContext, _payload: bytes) -> None:
    """A sync handler that ignores its cancellation and never returns."""
    sys.stdout.write("handler started\n")
    sys.stdout.flush()
    threading.Event().wait()


if __name__ == "__main__":
    stuck.configure(server=sys.argv[1])
    stuck.run()
    sys.stdout.write(f"run() returned; busy_threads = {stuck.busy_threads()}\n")
    sys.stdout.flush()
