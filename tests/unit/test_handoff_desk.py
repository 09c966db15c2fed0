"""HandoffDesk: which waiting poll an enqueue's task goes to, and what happens to leases
whose poll has gone (tests/integration/test_handoff.py runs it against a real server).

Statement rows are stood in by dicts with the two keys the desk reads (`leased`, `id`);
`release` records what the desk hands back.
"""

from __future__ import annotations

import asyncio
from typing import Any

from conveyor.server.handoff import HandoffDesk


class Released:
    def __init__(self) -> None:
        self.calls: list[tuple[list[Any], str]] = []

    async def __call__(self, rows: list[Any], worker_id: str) -> None:
        self.calls.append((rows, worker_id))


def row(task_id: str, *, leased: bool = True) -> dict[str, Any]:
    return {"id": task_id, "leased": leased}


def run(test: Any) -> None:
    asyncio.run(test())


def test_tasks_go_to_the_longest_waiting_poll_of_their_type_up_to_its_limit() -> None:
    async def test() -> None:
        desk = HandoffDesk(Released())
        first = desk.open("w1", ["a"], 2)
        other_type = desk.open("w2", ["b"], 5)
        second = desk.open("w3", ["a", "b"], 1)
        chosen = desk.reserve(["a", "a", "a", "b", "c"])
        assert chosen == [first, first, second, other_type, None]
        # Reserved offers take nothing from the next enqueue, even with room left.
        assert desk.reserve(["b"]) == [None]

    run(test)


def test_settle_delivers_each_poll_its_leased_rows_and_nothing_for_the_queued() -> None:
    async def test() -> None:
        desk = HandoffDesk(Released())
        offer = desk.open("w1", ["a"], 3)
        chosen = desk.reserve(["a", "a", "a"])
        desk.settle(chosen, [row("t1"), row("t2", leased=False), row("t3")])
        pending = desk.close(offer)
        assert pending is not None
        assert [r["id"] for r in await pending] == ["t1", "t3"]

    run(test)


def test_a_failed_statement_delivers_nothing() -> None:
    async def test() -> None:
        desk = HandoffDesk(Released())
        offer = desk.open("w1", ["a"], 1)
        desk.settle(desk.reserve(["a"]), None)
        pending = desk.close(offer)
        assert pending is not None
        assert await pending == []

    run(test)


def test_a_poll_that_stops_waiting_first_waits_for_its_reserved_rows() -> None:
    async def test() -> None:
        desk = HandoffDesk(Released())
        offer = desk.open("w1", ["a"], 1)
        chosen = desk.reserve(["a"])
        pending = desk.close(offer)  # woken by something else while the insert runs
        assert pending is not None
        assert not pending.done()
        desk.settle(chosen, [row("t1")])
        assert [r["id"] for r in await pending] == ["t1"]

    run(test)


def test_leases_of_an_abandoned_poll_are_handed_back() -> None:
    async def test() -> None:
        released = Released()
        desk = HandoffDesk(released)
        offer = desk.open("w1", ["a"], 2)
        chosen = desk.reserve(["a", "a"])
        assert desk.close(offer, abandon=True) is None  # the poll's call was cancelled
        desk.settle(chosen, [row("t1"), row("t2", leased=False)])
        await desk.handed_back()  # the hand-back runs as its own task
        assert [([r["id"] for r in rows], worker) for rows, worker in released.calls] == [
            (["t1"], "w1")
        ]

    run(test)


def test_rows_delivered_to_a_poll_cancelled_before_it_read_them_are_handed_back() -> None:
    async def test() -> None:
        released = Released()
        desk = HandoffDesk(released)
        offer = desk.open("w1", ["a"], 1)
        desk.settle(desk.reserve(["a"]), [row("t1")])
        assert desk.close(offer, abandon=True) is None
        await desk.handed_back()
        assert [worker for _, worker in released.calls] == ["w1"]

    run(test)


def test_a_closed_or_draining_desk_reserves_nothing() -> None:
    async def test() -> None:
        desk = HandoffDesk(Released())
        offer = desk.open("w1", ["a"], 1)
        assert desk.close(offer) is None
        assert desk.reserve(["a"]) == [None]
        desk.open("w2", ["a"], 1)
        desk.close_all()
        assert desk.reserve(["a"]) == [None]
        desk.open("w3", ["a"], 1)  # a poll arriving while the server drains
        assert desk.reserve(["a"]) == [None]

    run(test)
