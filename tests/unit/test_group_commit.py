"""GroupCommit's rules, driven by a scripted write (the server's and the client's use of it is
tested end to end in tests/integration/test_group_commit.py; here, only what it decides)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from conveyor.errors import InvalidTask, ServerUnavailable
from conveyor.group_commit import BlockingGroupCommit, GroupCommit, concatenated


class Store:
    """A write that answers each item with (item, True); held at `gate` while it is shut."""

    def __init__(self, *, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.writes: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.began = asyncio.Event()
        # A write of exactly this batch shuts the gate behind it and sets `held`.
        self.hold: list[str] | None = None
        self.held = asyncio.Event()

    async def write(self, batch: Sequence[str]) -> list[tuple[str, bool]]:
        self.writes.append(list(batch))
        self.began.set()
        if list(batch) == self.hold:
            self.gate.clear()
            self.held.set()
        await self.gate.wait()
        bad = self.refuse.intersection(batch)
        if bad:
            raise InvalidTask(f"bad item {min(bad)}")
        return [(item, True) for item in batch]


def options(*, split: bool = False, max_weight: int = 100) -> dict[str, Any]:
    """The settings under test, the same for both kinds: one write in flight."""
    return {
        "combine": concatenated,
        "count": len,
        "stopped": lambda: ServerUnavailable("stopped"),
        "split_on": (lambda exc: isinstance(exc, InvalidTask)) if split else None,
        "max_in_flight": 1,
        "max_weight": max_weight,
    }


Commit = GroupCommit[Sequence[str], tuple[str, bool]]


async def first_write_held(
    first: list[str], store: Store | None = None, **settings: Any
) -> tuple[Store, Commit, asyncio.Future[list[tuple[str, bool]]]]:
    """A group commit whose first write (of `first`) has begun and waits at the gate; calls
    submitted now queue behind it."""
    store = store or Store()
    commit: Commit = GroupCommit(store.write, **options(**settings))
    store.gate.clear()
    call = asyncio.ensure_future(commit.submit(first))
    await asyncio.wait_for(store.began.wait(), 5)
    return store, commit, call


def test_calls_that_wait_together_share_a_write_and_each_gets_its_own_rows() -> None:
    async def scenario() -> None:
        store, commit, first = await first_write_held(["a"])
        rest = [asyncio.ensure_future(commit.submit(batch)) for batch in (["b", "c"], ["d"])]
        await asyncio.sleep(0)
        store.gate.set()
        assert await first == [("a", True)]
        assert [await call for call in rest] == [[("b", True), ("c", True)], [("d", True)]]
        assert store.writes == [["a"], ["b", "c", "d"]]

    asyncio.run(scenario())


def test_a_group_stops_at_max_weight_but_a_heavy_call_still_goes_alone() -> None:
    async def scenario() -> None:
        store, commit, first = await first_write_held(["x"], max_weight=3)
        calls = [
            asyncio.ensure_future(commit.submit(batch))
            for batch in (["a", "b"], ["c", "d"], ["e", "f", "g", "h"])
        ]
        await asyncio.sleep(0)
        store.gate.set()
        await asyncio.gather(first, *calls)
        assert store.writes == [["x"], ["a", "b"], ["c", "d"], ["e", "f", "g", "h"]]

    asyncio.run(scenario())


def test_an_error_about_one_call_is_answered_per_call_when_split_on_says_so() -> None:
    async def scenario(split: bool) -> list[object]:
        store, commit, first = await first_write_held(
            ["a"], Store(refuse=frozenset({"bad"})), split=split
        )
        calls = [asyncio.ensure_future(commit.submit(b)) for b in (["b"], ["bad"], ["c"])]
        await asyncio.sleep(0)
        store.gate.set()
        return await asyncio.gather(first, *calls, return_exceptions=True)

    split = asyncio.run(scenario(split=True))
    assert split[:2] == [[("a", True)], [("b", True)]]
    assert isinstance(split[2], InvalidTask)
    assert split[3] == [("c", True)]
    # Without split_on, the shared write's error is every caller's.
    together = asyncio.run(scenario(split=False))
    assert together[0] == [("a", True)]
    assert all(isinstance(answer, InvalidTask) for answer in together[1:])


def test_a_call_cancelled_before_its_write_began_is_never_written() -> None:
    async def scenario() -> None:
        store, commit, first = await first_write_held(["a"])
        given_up = asyncio.ensure_future(commit.submit(["gone"]))
        kept = asyncio.ensure_future(commit.submit(["b"]))
        await asyncio.sleep(0)
        given_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await given_up
        store.gate.set()
        assert await first == [("a", True)]
        assert await kept == [("b", True)]
        assert store.writes == [["a"], ["b"]]

    asyncio.run(scenario())


def test_close_fails_the_waiting_calls_with_the_stopped_error() -> None:
    async def scenario() -> None:
        store, commit, in_flight = await first_write_held(["a"])
        waiting = asyncio.ensure_future(commit.submit(["b"]))
        await asyncio.sleep(0)
        await commit.close()
        for call in (in_flight, waiting):
            with pytest.raises(ServerUnavailable, match="stopped"):
                await call
        assert store.writes == [["a"]]

    asyncio.run(scenario())


# --- BlockingGroupCommit: the same rules for threads ----------------------------------------


class BlockingStore:
    """A blocking write that records (thread name, items); held at `gate` while it is shut."""

    def __init__(self, *, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.writes: list[tuple[str, list[str]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.began = threading.Event()

    def write(self, batch: Sequence[str]) -> list[tuple[str, bool]]:
        self.writes.append((threading.current_thread().name, list(batch)))
        self.began.set()
        assert self.gate.wait(10), "the test never opened the gate"
        bad = self.refuse.intersection(batch)
        if bad:
            raise InvalidTask(f"bad item {min(bad)}")
        return [(item, True) for item in batch]


def blocking_options(*, split: bool = False, **changes: Any) -> dict[str, Any]:
    """`options`, less `stopped`: a BlockingGroupCommit has nothing to close."""
    settings = {**options(split=split), **changes}
    del settings["stopped"]
    return settings


def blocking_commit(
    store: BlockingStore, *, split: bool = False
) -> BlockingGroupCommit[Sequence[str], tuple[str, bool]]:
    return BlockingGroupCommit(store.write, **blocking_options(split=split))


def run_threads(
    commit: BlockingGroupCommit[Sequence[str], tuple[str, bool]],
    store: BlockingStore,
    batches: dict[str, list[str]],
) -> dict[str, object]:
    """The first batch's thread writes alone (gated) while the others queue up behind it, in
    order; then the gate opens. Each thread's answer (rows or exception), by thread name."""
    answers: dict[str, object] = {}

    def call(batch: list[str]) -> None:
        try:
            answers[threading.current_thread().name] = commit.submit(batch)
        except BaseException as exc:  # KeyboardInterrupt too: a test interrupts a leader
            answers[threading.current_thread().name] = exc

    store.gate.clear()
    (first, first_batch), *rest = batches.items()
    threads = [threading.Thread(target=call, args=(first_batch,), name=first)]
    threads[0].start()
    assert store.began.wait(10)
    for queued, (name, batch) in enumerate(rest, start=1):
        threads.append(threading.Thread(target=call, args=(batch,), name=name))
        threads[-1].start()
        # One at a time, so they queue in this order.
        deadline = time.monotonic() + 10
        while len(commit._waiting) < queued:
            assert time.monotonic() < deadline, f"{name} never queued"
            time.sleep(0.001)
    store.gate.set()
    for thread in threads:
        thread.join(10)
    return answers


def test_threads_that_wait_together_share_a_write_led_by_the_oldest() -> None:
    store = BlockingStore()
    commit = blocking_commit(store)
    answers = run_threads(commit, store, {"A": ["a"], "B": ["b", "c"], "C": ["d"]})
    assert answers == {"A": [("a", True)], "B": [("b", True), ("c", True)], "C": [("d", True)]}
    # A wrote only its own call and returned; B, the oldest waiting, led the next write.
    assert store.writes == [("A", ["a"]), ("B", ["b", "c", "d"])]


def test_a_write_interrupted_in_its_leading_thread_is_sent_again_for_the_others() -> None:
    """B leads a write that carries C's call too, and is interrupted (KeyboardInterrupt)
    with the request sent: C's call goes again, led by C, and is answered. It used to be
    failed with ServerUnavailable, though its rows may have been written: the retry that
    error invites wrote them twice."""
    store = BlockingStore()
    interrupted: list[str] = []

    def write(batch: Sequence[str]) -> list[tuple[str, bool]]:
        rows = store.write(batch)
        if threading.current_thread().name == "B" and not interrupted:
            interrupted.append("B")
            raise KeyboardInterrupt
        return rows

    commit = BlockingGroupCommit(write, **blocking_options())
    answers = run_threads(commit, store, {"A": ["a"], "B": ["b"], "C": ["c"]})
    assert isinstance(answers["B"], KeyboardInterrupt)
    assert answers["A"] == [("a", True)]
    assert answers["C"] == [("c", True)]
    assert store.writes == [("A", ["a"]), ("B", ["b", "c"]), ("C", ["c"])]
    assert commit._in_flight == 0
    assert not commit._waiting


def test_threads_get_their_own_errors_when_split_on_says_so() -> None:
    store = BlockingStore(refuse=frozenset({"bad"}))
    commit = blocking_commit(store, split=True)
    answers = run_threads(commit, store, {"A": ["a"], "B": ["b"], "X": ["bad"], "C": ["c"]})
    assert answers["A"] == [("a", True)]
    assert answers["B"] == [("b", True)]
    assert isinstance(answers["X"], InvalidTask)
    assert answers["C"] == [("c", True)]
    assert commit._in_flight == 0


def test_each_caller_of_a_failed_shared_write_gets_its_own_error_object() -> None:
    async def scenario() -> list[object]:
        store, commit, first = await first_write_held(["a"], Store(refuse=frozenset({"b"})))
        calls = [asyncio.ensure_future(commit.submit(batch)) for batch in (["b"], ["c"])]
        await asyncio.sleep(0)
        store.gate.set()
        await first
        return await asyncio.gather(*calls, return_exceptions=True)

    errors = asyncio.run(scenario())
    assert all(isinstance(error, InvalidTask) for error in errors)
    # One object raised by several callers would rewrite its traceback under the others.
    assert errors[0] is not errors[1]
    assert str(errors[0]) == str(errors[1])


def test_close_before_a_flush_starts_frees_its_slot() -> None:
    async def scenario() -> None:
        commit: Commit = GroupCommit(Store().write, **options())
        call = asyncio.ensure_future(commit.submit(["a"]))
        await asyncio.sleep(0)  # the call queued and scheduled a flush, not yet run
        await commit.close()
        with pytest.raises(ServerUnavailable, match="stopped"):
            await call
        # Usable again (a client reopens its channels after close).
        assert await asyncio.wait_for(commit.submit(["b"]), 5) == [("b", True)]

    asyncio.run(scenario())


def test_a_call_made_while_close_runs_keeps_the_count_of_writes_in_flight() -> None:
    """A call arrives after close() cancelled the write in flight and before close() has
    resumed: it starts a flush of its own. close() used to reset the count of writes in
    flight to zero, that flush's end took it below zero, and from then on one more write
    than `max_in_flight` could run at once."""

    async def scenario() -> None:
        store, commit, in_flight = await first_write_held(["a"])
        (flush,) = commit._flushes
        during_close: list[asyncio.Future[list[tuple[str, bool]]]] = []
        # Registered before close()'s own wait on the flush: it runs first.
        flush.add_done_callback(
            lambda _: during_close.append(asyncio.ensure_future(commit.submit(["b"])))
        )
        await commit.close()
        with pytest.raises(ServerUnavailable, match="stopped"):
            await in_flight
        with pytest.raises(ServerUnavailable, match="stopped"):
            await during_close[0]
        await asyncio.wait_for(asyncio.gather(*commit._flushes), 5)
        assert commit._in_flight == 0
        store.gate.set()
        assert await asyncio.wait_for(commit.submit(["c"]), 5) == [("c", True)]
        assert commit._in_flight == 0

    asyncio.run(scenario())


def test_close_during_a_split_answers_every_call_of_the_group() -> None:
    async def scenario() -> list[object]:
        store, commit, first = await first_write_held(
            ["a"], Store(refuse=frozenset({"bad"})), split=True
        )
        calls = [asyncio.ensure_future(commit.submit(b)) for b in (["b"], ["bad"], ["c"])]
        await asyncio.sleep(0)
        store.hold = ["b"]  # the first call sent again on its own: hold it there
        store.gate.set()
        await first
        await asyncio.wait_for(store.held.wait(), 5)
        await commit.close()
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)

    answers = asyncio.run(scenario())
    assert all(isinstance(answer, ServerUnavailable) for answer in answers), answers


THREADS, CALLS = 12, 100


def test_many_threads_with_two_slots_hand_every_slot_back() -> None:
    """Leaders hand their slots on while other leaders answer the calls they were handed
    to: whatever the interleaving, every call is answered and no slot is lost."""
    store = BlockingStore()
    jitter = random.Random(5)

    def write(batch: Sequence[str]) -> list[tuple[str, bool]]:
        # Writes of uneven length, so leaders finish in every order.
        time.sleep(jitter.random() / 2000)
        return store.write(batch)

    commit = BlockingGroupCommit(write, **blocking_options(max_in_flight=2))
    answers: list[list[tuple[str, bool]]] = []

    def producer(index: int) -> None:
        answers.extend(commit.submit([f"{index}-{call}"]) for call in range(CALLS))

    threads = [threading.Thread(target=producer, args=(index,)) for index in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == THREADS * CALLS
    assert commit._in_flight == 0
    assert not commit._waiting


@pytest.mark.skipif(
    not hasattr(asyncio, "eager_task_factory"), reason="eager tasks came with Python 3.12"
)
def test_the_count_of_writes_in_flight_holds_under_an_eager_task_factory() -> None:
    """Under an eager task factory a flush starts before create_task returns its task: a
    flush recognised by its task as not yet started was counted free twice, and the
    count fell below zero (found by a review)."""

    async def scenario() -> None:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        store = Store()
        commit: Commit = GroupCommit(store.write, **options())
        for batch in (["a"], ["b"], ["c"]):
            assert await asyncio.wait_for(commit.submit(batch), 5) == [(batch[0], True)]
        await asyncio.sleep(0)  # the flushes' done callbacks
        assert commit._in_flight == 0

    asyncio.run(scenario())
