"""Producers sharing a Client / AsyncClient with two server processes while those are
SIGKILLed, stopped gracefully, restarted on the same port and frozen with SIGSTOP.

Covers what the existing tests do not put together: every acknowledged enqueue (ids set by
the producer) is stored, nothing is stored that was not asked for, every error is a typed
ConveyorError, no call outlives twice its retry budget, and close() returns promptly."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from typing import Any

import pytest
from helpers import wait_for

from conveyor import AsyncClient, Client, RetryPolicy, Task
from conveyor.errors import ConveyorError

pytestmark = pytest.mark.slow  # server processes killed, frozen and restarted

RETRY = RetryPolicy(call_timeout=3, total_timeout=8, backoff_base=0.02, backoff_cap=0.3)


def churn(a: Any, b: Any, acked: list[str]) -> None:
    """Kill A, restart it on its port, stop B gracefully, restart it, freeze A, thaw it;
    after each step, wait until the producers have had more tasks acknowledged."""

    def progress(what: str) -> None:
        mark = len(acked)
        wait_for(lambda: len(acked) > mark + 50, timeout=40, what=f"enqueues after {what}")

    progress("the start")
    a.stop(signal.SIGKILL)
    progress("A killed")
    a.start()
    progress("A restarted")
    b.stop(signal.SIGTERM)
    progress("B stopped")
    b.start()
    progress("B restarted")
    a.process.signal(signal.SIGSTOP)
    try:
        progress("A frozen")
    finally:
        a.process.signal(signal.SIGCONT)
    progress("A thawed")


def check(db: Any, acked: list[str], errors: list[BaseException], attempted: set[str]) -> None:
    stored = {r["id"] for r in db.fetch("SELECT id::text AS id FROM conveyor_tasks")}
    missing = [i for i in acked if i not in stored]
    assert not missing, f"{len(missing)} acknowledged tasks missing"
    assert stored <= attempted, f"unknown tasks stored: {len(stored - attempted)}"
    untyped = [e for e in errors if not isinstance(e, ConveyorError)]
    assert not untyped, f"untyped errors: {untyped[:3]}"


def test_sync_client_under_churn(server_process: Any, db: Any) -> None:
    a, b = server_process(), server_process()
    client = Client([a.address, b.address], retry=RETRY)
    stop = threading.Event()
    acked: list[str] = []
    errors: list[BaseException] = []
    attempted: set[str] = set()
    slow: list[float] = []

    def produce(n: int) -> None:
        while not stop.is_set():
            ids = [str(uuid.uuid4()) for _ in range(n)]
            attempted.update(ids)
            started = time.monotonic()
            try:
                got = client.enqueue_tasks([Task(type="churn", id=i) for i in ids])
                assert got == ids
                acked.extend(got)
                client.get_task_status(ids[0])
            except BaseException as exc:
                errors.append(exc)
            took = time.monotonic() - started
            if took > 2 * RETRY.total_timeout.total_seconds() + 3:
                slow.append(took)

    threads = [threading.Thread(target=produce, args=(n,), daemon=True) for n in (1, 1, 3, 20)]
    for t in threads:
        t.start()
    try:
        churn(a, b, acked)
    finally:
        stop.set()
        for t in threads:
            t.join(40)
    hung = [t for t in threads if t.is_alive()]
    started = time.monotonic()
    client.close()
    closing = time.monotonic() - started
    assert not hung
    assert not slow, slow
    assert closing < 3, closing
    check(db, acked, errors, attempted)


async def test_async_client_under_churn(server_process: Any, db: Any) -> None:
    a, b = server_process(), server_process()
    client = AsyncClient([a.address, b.address], retry=RETRY)
    stop = asyncio.Event()
    acked: list[str] = []
    errors: list[BaseException] = []
    attempted: set[str] = set()
    slow: list[float] = []

    async def produce(n: int) -> None:
        while not stop.is_set():
            ids = [str(uuid.uuid4()) for _ in range(n)]
            attempted.update(ids)
            started = time.monotonic()
            try:
                got = await client.enqueue_tasks([Task(type="churn", id=i) for i in ids])
                assert got == ids
                acked.extend(got)
                await client.get_task_status(ids[0])
            except BaseException as exc:
                errors.append(exc)
            took = time.monotonic() - started
            if took > 2 * RETRY.total_timeout.total_seconds() + 3:
                slow.append(took)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(produce(n)) for n in (1, 1, 1, 1, 3, 20)]
    try:
        await asyncio.to_thread(churn, a, b, acked)
    finally:
        stop.set()
    _, pending = await asyncio.wait(tasks, timeout=40)
    started = time.monotonic()
    await client.close()
    closing = time.monotonic() - started
    assert not pending
    assert not slow, slow
    assert closing < 3, closing
    await asyncio.to_thread(check, db, acked, errors, attempted)
