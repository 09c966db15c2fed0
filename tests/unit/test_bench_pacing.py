"""The benchmark's W2 pacers (benchmarks/peers/common.py): open loop, bounded, honest.

W2 compares start latencies across systems only if every producer sends the same load the
same way. These tests hold the pacers to that: a slow call does not hold back the next
(the closed-loop producer the peers had until the eighteenth session sent 20/s of a 200/s
schedule here), no more than ``in_flight`` calls are ever open, and a failed call fails
the run instead of shrinking it.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from bench_modules import load_bench_module

RATE = 200.0
SECONDS = 0.5
CALLS = int(RATE * SECONDS)
SLOW_CALL = 0.05  # ten intervals at 200/s: a producer that waits for each call sends 20/s


common = load_bench_module("peers/common.py", "bench_peers_common")


class OpenCalls:
    """Counts the calls open at once, from any thread."""

    def __init__(self) -> None:
        self.open = 0
        self.most = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.open += 1
            self.most = max(self.most, self.open)

    def leave(self) -> None:
        with self.lock:
            self.open -= 1

    async def slow_enqueue(self, _i: int) -> None:
        """An async enqueue that takes SLOW_CALL, counted while open."""
        self.enter()
        await asyncio.sleep(SLOW_CALL)
        self.leave()


def test_the_async_pacer_sends_on_schedule_whatever_each_call_takes() -> None:
    calls = OpenCalls()
    sent = asyncio.run(common.paced_async(RATE, SECONDS, calls.slow_enqueue))
    assert sorted(sent.enqueued_at) == list(range(CALLS))
    assert sent.achieved_rate is not None
    assert sent.achieved_rate > RATE / 2
    assert calls.most > 1, "each call waited for the one before: closed loop"
    assert calls.open == 0, "the pacer returned before its calls finished"


def test_the_async_pacer_never_has_more_than_its_bound_open() -> None:
    calls = OpenCalls()
    sent = asyncio.run(common.paced_async(RATE, SECONDS, calls.slow_enqueue, in_flight=3))
    assert calls.most == 3
    assert len(sent.enqueued_at) == CALLS
    # Three slots of 50 ms carry 60 calls/s: the sends fell behind, and the result says so.
    assert sent.worst_late > SLOW_CALL
    assert sent.achieved_rate is not None
    assert sent.achieved_rate < RATE / 2


def test_the_threaded_pacer_sends_on_schedule_with_an_enqueue_per_thread() -> None:
    calls = OpenCalls()
    made: list[int] = []

    def make_enqueue() -> object:
        made.append(threading.get_ident())

        def slow_enqueue(_i: int) -> None:
            calls.enter()
            time.sleep(SLOW_CALL)
            calls.leave()

        return slow_enqueue

    sent = common.paced(RATE, SECONDS, make_enqueue, in_flight=8)
    assert len(set(made)) == 8, "each producer thread builds its own enqueue function"
    assert sorted(sent.enqueued_at) == list(range(CALLS))
    assert sent.achieved_rate is not None
    assert sent.achieved_rate > RATE / 2
    assert 1 < calls.most <= 8
    assert calls.open == 0


def test_a_failed_call_fails_the_run_after_the_others_went_out() -> None:
    done: list[int] = []

    def make_enqueue() -> object:
        def enqueue(i: int) -> None:
            if i == 3:
                raise ConnectionError("broker gone")
            done.append(i)

        return enqueue

    with pytest.raises(RuntimeError, match="broker gone"):
        common.paced(RATE, 0.1, make_enqueue, in_flight=2)
    assert sorted(done) == [i for i in range(int(RATE * 0.1)) if i != 3]


def test_a_producer_that_cannot_start_fails_the_run_with_its_own_error() -> None:
    def make_enqueue() -> object:
        raise ConnectionRefusedError("no broker")

    with pytest.raises(RuntimeError, match="no broker"):
        common.paced(RATE, 0.1, make_enqueue, in_flight=2)
