"""GroupCommit's rules, driven by a scripted write (the server's and the client's use of it is
tested end to end in tests/integration/test_group_commit.py; here, only what it decides)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from conveyor.errors import InvalidTask, ServerUnavailable
from conveyor.group_commit import GroupCommit, concatenated


class Store:
    """A write that answers each item with (item, True); held at `gate` while it is shut."""

    def __init__(self, *, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.writes: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.began = asyncio.Event()

    async def write(self, batch: Sequence[str]) -> list[tuple[str, bool]]:
        self.writes.append(list(batch))
        self.began.set()
        await self.gate.wait()
        bad = self.refuse.intersection(batch)
        if bad:
            raise InvalidTask(f"bad item {min(bad)}")
        return [(item, True) for item in batch]


def group_commit(
    store: Store, *, split: bool = False, max_weight: int = 100
) -> GroupCommit[Sequence[str], tuple[str, bool]]:
    return GroupCommit(
        store.write,
        combine=concatenated,
        count=len,
        stopped=lambda: ServerUnavailable("stopped"),
        split_on=(lambda exc: isinstance(exc, InvalidTask)) if split else None,
        max_in_flight=1,
        max_weight=max_weight,
    )


async def _started(store: Store) -> None:
    """Until the first write has begun (bounded)."""
    await asyncio.wait_for(store.began.wait(), 5)


def test_calls_that_wait_together_share_a_write_and_each_gets_its_own_rows() -> None:
    async def scenario() -> None:
        store = Store()
        commit = group_commit(store)
        store.gate.clear()
        first = asyncio.ensure_future(commit.submit(["a"]))
        await _started(store)
        rest = [asyncio.ensure_future(commit.submit(batch)) for batch in (["b", "c"], ["d"])]
        await asyncio.sleep(0)
        store.gate.set()
        assert await first == [("a", True)]
        assert [await call for call in rest] == [[("b", True), ("c", True)], [("d", True)]]
        assert store.writes == [["a"], ["b", "c", "d"]]

    asyncio.run(scenario())


def test_a_group_stops_at_max_weight_but_a_heavy_call_still_goes_alone() -> None:
    async def scenario() -> None:
        store = Store()
        commit = group_commit(store, max_weight=3)
        store.gate.clear()
        first = asyncio.ensure_future(commit.submit(["x"]))
        await _started(store)
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
        store = Store(refuse=frozenset({"bad"}))
        commit = group_commit(store, split=split)
        store.gate.clear()
        first = asyncio.ensure_future(commit.submit(["a"]))
        await _started(store)
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
        store = Store()
        commit = group_commit(store)
        store.gate.clear()
        first = asyncio.ensure_future(commit.submit(["a"]))
        await _started(store)
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
        store = Store()
        commit = group_commit(store)
        store.gate.clear()
        in_flight = asyncio.ensure_future(commit.submit(["a"]))
        await _started(store)
        waiting = asyncio.ensure_future(commit.submit(["b"]))
        await asyncio.sleep(0)
        await commit.close()
        for call in (in_flight, waiting):
            with pytest.raises(ServerUnavailable, match="stopped"):
                await call
        assert store.writes == [["a"]]

    asyncio.run(scenario())
