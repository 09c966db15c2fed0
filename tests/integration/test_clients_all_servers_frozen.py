"""Every server of a client frozen with SIGSTOP (the kernel accepts TCP, nothing answers),
with enqueue streams already open to both: concurrent enqueue_task, enqueue_tasks,
get_task_status and cancel_task all end within their documented bound (the retry budget;
twice that for an enqueue that first waits for another in flight) with ServerUnavailable or
CircuitOpen, and close() returns at once. The existing tests cover a black-holed link to
one server; not this."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from conveyor import AsyncClient, Client, RetryPolicy, Task

pytestmark = pytest.mark.slow  # server processes frozen with SIGSTOP

RETRY = RetryPolicy(call_timeout=2, total_timeout=5, backoff_base=0.02, backoff_cap=0.3)
BUDGET = 5.0


CALLS: dict[str, Callable[[Client], object]] = {
    "enqueue": lambda client: client.enqueue_task(Task(type="s")),
    "bulk": lambda client: client.enqueue_tasks([Task(type="s")] * 10),
    "get": lambda client: client.get_task_status(str(uuid.uuid4())),
    "cancel": lambda client: client.cancel_task(str(uuid.uuid4())),
}


def test_sync_all_stopped(server_process: Any) -> None:
    a, b = server_process(), server_process()
    client = Client([a.address, b.address], retry=RETRY)
    # Streams open to both.
    client.enqueue_task(Task(type="s"))
    client._ring.advance()
    client.enqueue_task(Task(type="s"))
    results: list[tuple[str, float, str]] = []
    for s in (a, b):
        s.process.signal(signal.SIGSTOP)
    try:

        def run(kind: str) -> None:
            for _ in range(2):
                started = time.monotonic()
                try:
                    CALLS[kind](client)
                    out = "ok"
                except Exception as exc:
                    out = type(exc).__name__
                results.append((kind, time.monotonic() - started, out))

        threads = [
            threading.Thread(target=run, args=(k,), daemon=True)
            for k in ("enqueue", "enqueue", "bulk", "get", "cancel")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        started = time.monotonic()
        client.close()
        closing = time.monotonic() - started
    finally:
        for s in (a, b):
            s.process.signal(signal.SIGCONT)
    assert not [t for t in threads if t.is_alive()]
    for kind, took, out in results:
        bound = 2 * BUDGET if kind in ("enqueue", "bulk") else BUDGET
        assert took < bound + 1.5, (kind, took, out)
        assert out in ("ServerUnavailable", "CircuitOpen"), (kind, out)
    assert closing < 2.5, closing


async def test_async_all_stopped(server_process: Any) -> None:
    a, b = server_process(), server_process()
    client = AsyncClient([a.address, b.address], retry=RETRY)
    await client.enqueue_task(Task(type="s"))
    client._ring.advance()
    await client.enqueue_task(Task(type="s"))
    for s in (a, b):
        s.process.signal(signal.SIGSTOP)
    results: list[tuple[str, float, str]] = []
    try:

        async def run(kind: str) -> None:
            for _ in range(2):
                started = time.monotonic()
                try:
                    if kind == "enqueue":
                        await client.enqueue_task(Task(type="s"))
                    elif kind == "bulk":
                        await client.enqueue_tasks([Task(type="s")] * 10)
                    elif kind == "get":
                        await client.get_task_status(str(uuid.uuid4()))
                    else:
                        await client.cancel_task(str(uuid.uuid4()))
                    out = "ok"
                except Exception as exc:
                    out = type(exc).__name__
                results.append((kind, time.monotonic() - started, out))

        await asyncio.wait_for(
            asyncio.gather(*(run(k) for k in ["enqueue"] * 6 + ["bulk", "get", "cancel"])), 60
        )
        started = time.monotonic()
        await client.close()
        closing = time.monotonic() - started
    finally:
        for s in (a, b):
            s.process.signal(signal.SIGCONT)
    for kind, took, out in results:
        assert took < BUDGET + 1.5, (kind, took, out)
        assert out in ("ServerUnavailable", "CircuitOpen"), (kind, out)
    assert closing < 2.5, closing
