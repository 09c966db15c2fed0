"""Slots in use never exceed `concurrency`, and never leak."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta

from helpers import wait_final, wait_for

from conveyor import Client, Task, TaskState, Worker


class SlotLedger:
    """Start/end of every handler run, and the peak of handlers running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.rows: list[tuple[str, str, float]] = []

    def start(self, task_id: str) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.rows.append(("start", task_id, time.monotonic()))

    def end(self, task_id: str) -> None:
        with self.lock:
            self.running -= 1
            self.rows.append(("end", task_id, time.monotonic()))

    def reset_peak(self) -> None:
        with self.lock:
            self.peak = self.running


def test_concurrency_one_across_timeouts_cancels_and_retries(server, client: Client) -> None:
    """concurrency=1: never two handlers at once, through sync and async timeouts that
    ignore the stop, a cancel of a running task and retries of the same tasks."""
    ledger = SlotLedger()

    def stubborn_sync(ctx, payload):
        ledger.start(ctx.task_id)
        try:
            time.sleep(0.8)  # past its 0.3 s timeout, ignoring ctx.cancelled
        finally:
            ledger.end(ctx.task_id)

    async def stubborn_async(ctx, payload):
        ledger.start(ctx.task_id)
        try:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                await asyncio.sleep(0.5)  # swallows its cancellation for a while
        finally:
            ledger.end(ctx.task_id)

    def quick(ctx, payload):
        ledger.start(ctx.task_id)
        try:
            time.sleep(0.05)
        finally:
            ledger.end(ctx.task_id)

    worker = Worker(server.address, concurrency=1, lease_wait=1)
    worker.register_handler("stubborn_sync", stubborn_sync)
    worker.register_handler("stubborn_async", stubborn_async)
    worker.register_handler("quick", quick)
    worker.start()
    try:
        short = timedelta(milliseconds=300)
        ids = [
            client.enqueue_task(Task(type="stubborn_sync", timeout=short, max_retries=1)),
            client.enqueue_task(Task(type="stubborn_async", timeout=short, max_retries=1)),
        ]
        ids += [client.enqueue_task(Task(type="quick")) for _ in range(5)]
        for task_id in ids:
            wait_final(client, task_id, timeout=60)
    finally:
        worker.stop()
    assert ledger.peak == 1, ledger.rows


def test_concurrency_above_the_lease_batch_fills_every_slot(start_server, client) -> None:
    """concurrency 600 > max_lease_batch (256 by default): all 600 slots fill, no more."""
    server = start_server()
    ledger = SlotLedger()
    release = threading.Event()

    async def waiting(ctx, payload):
        ledger.start(ctx.task_id)
        try:
            while not release.is_set():  # noqa: ASYNC110 - a threading.Event, set elsewhere
                await asyncio.sleep(0.05)
        finally:
            ledger.end(ctx.task_id)

    c = Client(server.address)
    worker = Worker(server.address, concurrency=600, lease_wait=1)
    worker.register_handler("waiting", waiting)
    worker.start()
    try:
        ids = c.enqueue_tasks([Task(type="waiting") for _ in range(800)])
        wait_for(lambda: ledger.running >= 600, timeout=60, what="600 handlers running")
        time.sleep(1.0)
        assert ledger.peak == 600
        release.set()
        for task_id in ids[-5:]:
            assert wait_final(c, task_id, timeout=60).state is TaskState.SUCCEEDED
    finally:
        release.set()
        worker.stop()
        c.close()
    assert ledger.peak == 600


def test_no_slot_leaks_after_many_kinds_of_endings(  # noqa: C901, PLR0915 - one scenario
    server, client: Client
) -> None:
    """After timeouts, failures, cancels and successes, all 4 slots still run at once."""
    ledger = SlotLedger()
    gate = threading.Event()

    def mixed(ctx, payload):
        ledger.start(ctx.task_id)
        try:
            kind = payload.decode()
            if kind == "fail":
                raise RuntimeError("boom")
            if kind == "timeout":
                time.sleep(0.4)
            if kind == "hold":
                ctx.cancelled.wait(10)
                time.sleep(0.2)
            if kind == "gate":
                gate.wait(20)
        finally:
            ledger.end(ctx.task_id)

    async def amixed(ctx, payload):
        ledger.start(ctx.task_id)
        try:
            kind = payload.decode()
            if kind == "fail":
                raise RuntimeError("boom")
            if kind == "timeout":
                await asyncio.sleep(5)
            if kind == "hold":
                await asyncio.sleep(30)
            if kind == "gate":
                while not gate.is_set():  # noqa: ASYNC110 - a threading.Event
                    await asyncio.sleep(0.02)
        finally:
            ledger.end(ctx.task_id)

    worker = Worker(server.address, concurrency=4, lease_wait=1)
    worker.register_handler("mixed", mixed)
    worker.register_handler("amixed", amixed)
    worker.start()
    try:
        short = timedelta(milliseconds=200)
        for round_ in range(3):
            ids = []
            for kind in ("mixed", "amixed"):
                ids += [
                    client.enqueue_task(Task(type=kind, payload=b"fail", max_retries=1))
                    for _ in range(3)
                ]
                ids += [
                    client.enqueue_task(
                        Task(type=kind, payload=b"timeout", timeout=short, max_retries=1)
                    )
                    for _ in range(3)
                ]
                ids += [client.enqueue_task(Task(type=kind, payload=b"ok")) for _ in range(5)]
                holds = [client.enqueue_task(Task(type=kind, payload=b"hold")) for _ in range(2)]
                for hold in holds:
                    wait_for(
                        lambda hold=hold: (
                            client.get_task_status(hold).state
                            in (TaskState.RUNNING, TaskState.SUCCEEDED)
                        ),
                        timeout=30,
                        what="hold running",
                    )
                    client.cancel_task(hold)
                ids += holds
            for task_id in ids:
                wait_final(client, task_id, timeout=60)
            wait_for(lambda: ledger.running == 0, timeout=30, what=f"round {round_} idle")
        ledger.reset_peak()
        gates = [client.enqueue_task(Task(type="mixed", payload=b"gate")) for _ in range(2)]
        gates += [client.enqueue_task(Task(type="amixed", payload=b"gate")) for _ in range(2)]
        wait_for(lambda: ledger.running == 4, timeout=20, what="all 4 slots running")
        gate.set()
        for task_id in gates:
            assert wait_final(client, task_id, timeout=30).state is TaskState.SUCCEEDED
    finally:
        gate.set()
        worker.stop()
    assert ledger.peak <= 4
    assert worker.metrics is not None
