"""Workers and handlers that the multi-process tests run as `conveyor worker worker_apps:...`.

Every handler appends to an independent ledger (the file named by CONVEYOR_TEST_LEDGER):
one line per start and per normal end, with task id, attempt, lease id, pid and time. A
single `write` of a short line to an O_APPEND file is atomic across processes, so tests
count real executions from it, independently of what the queue reports.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from conveyor import TaskContext, Worker
from conveyor.errors import PermanentFailure


def record(event: str, ctx: TaskContext) -> None:
    path = os.environ.get("CONVEYOR_TEST_LEDGER")
    if not path:
        return
    line = f"{event}\t{ctx.task_id}\t{ctx.attempt}\t{ctx.lease_id}\t{os.getpid()}\t{time.time()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def noop(ctx: TaskContext, payload: bytes) -> bytes:
    record("start", ctx)
    record("end", ctx)
    return payload


async def async_noop(ctx: TaskContext, payload: bytes) -> bytes:
    record("start", ctx)
    record("end", ctx)
    return payload


async def sleep(ctx: TaskContext, payload: bytes) -> bytes:
    """Sleep for float(payload) seconds; cancellable."""
    record("start", ctx)
    await asyncio.sleep(float(payload or b"0"))
    record("end", ctx)
    return b"slept"


def sync_sleep(ctx: TaskContext, payload: bytes) -> bytes:
    """Sleep for float(payload) seconds in a thread, stopping early if cancelled."""
    record("start", ctx)
    if ctx.cancelled.wait(float(payload or b"0")):
        record("cancelled", ctx)
        return b"stopped early"
    record("end", ctx)
    return b"slept"


def flaky(ctx: TaskContext, payload: bytes) -> bytes:
    """Fail until the attempt number reaches int(payload)."""
    record("start", ctx)
    if ctx.attempt < int(payload or b"1"):
        raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
    record("end", ctx)
    return b"finally"


def always_fail(ctx: TaskContext, payload: bytes) -> bytes:
    record("start", ctx)
    raise ValueError(payload.decode() or "always fails")


def permanent_fail(ctx: TaskContext, payload: bytes) -> bytes:
    record("start", ctx)
    raise PermanentFailure("this input can never succeed")


def fail_once(ctx: TaskContext, payload: bytes) -> bytes:
    """Fail the first attempt with an error quoting the payload; succeed on the next."""
    record("start", ctx)
    if ctx.attempt == 1:
        raise RuntimeError(f"first attempt fails on purpose: {payload.decode()}")
    record("end", ctx)
    return b"done on attempt %d" % ctx.attempt


# A plain stdlib logger, as an application's own code would use: not ctx.logger.
app_log = logging.getLogger("worker_apps.handler")


def log_line(ctx: TaskContext, payload: bytes) -> bytes:
    """Log one line with the application's own logger, from a handler thread."""
    record("start", ctx)
    app_log.info("handling %s", payload.decode(), extra={"event": "handler_says"})
    record("end", ctx)
    return payload


async def async_log_line(ctx: TaskContext, payload: bytes) -> bytes:
    """Log one line with the application's own logger, on the worker's event loop."""
    record("start", ctx)
    app_log.info("handling %s", payload.decode(), extra={"event": "handler_says"})
    record("end", ctx)
    return payload


def burn(ctx: TaskContext, payload: bytes) -> bytes:
    """Pure-Python work, holding the GIL but between its switches, for float(payload) s."""
    record("start", ctx)
    end = time.monotonic() + float(payload)
    spins = 0
    while time.monotonic() < end:
        spins += 1
    record("end", ctx)
    return str(spins).encode()


async def block_the_loop(ctx: TaskContext, payload: bytes) -> bytes:
    """An async handler doing blocking work: the worker's event loop stops for float(payload) s."""
    record("start", ctx)
    time.sleep(float(payload))  # noqa: ASYNC251 - blocking the loop is the point
    return b""


def build(concurrency: int = 4) -> Worker:
    worker = Worker(concurrency=concurrency)
    for name, fn in {
        "noop": noop,
        "async_noop": async_noop,
        "sleep": sleep,
        "sync_sleep": sync_sleep,
        "flaky": flaky,
        "always_fail": always_fail,
        "permanent_fail": permanent_fail,
        "fail_once": fail_once,
        "log_line": log_line,
        "async_log_line": async_log_line,
        "burn": burn,
    }.items():
        worker.register_handler(name, fn)
    return worker


worker = build()

# For a stop that cannot end: its one handler blocks the event loop, its drain is short.
loop_blocker = Worker(concurrency=1, drain_timeout=1)
loop_blocker.register_handler("block_the_loop", block_the_loop)
