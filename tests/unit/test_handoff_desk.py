"""HandoffDesk: which waiting poll an enqueue's task goes to, and what happens to leases
whose poll has gone (tests/integration/test_handoff.py runs it against a real server).

Statement rows are stood in by dicts with the two keys the desk reads (`leased`, `id`);
`release` records what the desk hands back.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

from conveyor.server.handoff import POLL_ENDED, STATEMENT_FAILED, HandoffDesk

LEASE = timedelta(seconds=30)


class Released:
    def __init__(self) -> None:
        self.calls: list[tuple[list[Any], str]] = []
        self.reasons: list[str] = []

    async def __call__(self, rows: list[Any], worker_id: str, reason: str) -> None:
        self.calls.append((rows, worker_id))
        self.reasons.append(reason)


def row(task_id: str, *, leased: bool = True) -> dict[str, Any]:
    return {"id": task_id, "leased": leased}


def run(test: Any) -> None:
    asyncio.run(test())


def test_tasks_go_to_the_longest_waiting_poll_of_their_type_up_to_its_limit() -> None:
    async def test() -> None:
        desk = HandoffDesk(Released())
        first = desk.open("w1", ["a"], 2, LEASE)
        other_type = desk.open("w2", ["b"], 5, LEASE)
        second = desk.open("w3", ["a", "b"], 1, LEASE)
        chosen = desk.reserve(["a", "a", "a", "b", "c"])
        assert chosen == [first, first, second, other_type, None]
        # Reserved offers take nothing from the next enqueue, even with room left.
        assert desk.reserve(["b"]) == [None]

    run(test)


def test_settle_delivers_each_poll_its_leased_rows_and_nothing_for_the_queued() -> None:
    async def test() -> None:
        desk = HandoffDesk(Released())
        offer = desk.open("w1", ["a"], 3, LEASE)
        chosen = desk.reserve(["a", "a", "a"])
        desk.settle(chosen, [row("t1"), row("t2", leased=False), row("t3")])
        pending = desk.close(offer)
        assert pending is not None
        assert [r["id"] for r in await pending] == ["t1", "t3"]

    run(test)


def test_a_failed_statement_hands_every_offered_lease_back_and_delivers_nothing() -> None:
    """The statement raised: it may have committed, so each offered task is handed back by
    the lease id it would have had (a no-op for one never leased)."""

    async def test() -> None:
        released = Released()
        desk = HandoffDesk(released)
        offer = desk.open("w1", ["a"], 2, LEASE)
        chosen = desk.reserve(["a", "b", "a"])
        desk.settle_unknown(chosen, ["t1", "t2", "t3"], ["l1", None, "l3"])
        pending = desk.close(offer)
        assert pending is not None
        assert await pending == []
        await desk.handed_back(5)
        assert released.calls == [
            ([{"id": "t1", "lease_id": "l1"}, {"id": "t3", "lease_id": "l3"}], "w1")
        ]
        assert released.reasons == [STATEMENT_FAILED]

    run(test)


def test_a_poll_that_stops_waiting_first_waits_for_its_reserved_rows() -> None:
    async def test() -> None:
        desk = HandoffDesk(Released())
        offer = desk.open("w1", ["a"], 1, LEASE)
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
        offer = desk.open("w1", ["a"], 2, LEASE)
        chosen = desk.reserve(["a", "a"])
        assert desk.close(offer, abandon=True) is None  # the poll's call was cancelled
        desk.settle(chosen, [row("t1"), row("t2", leased=False)])
        await desk.handed_back(5)  # the hand-back runs as its own task
        assert [([r["id"] for r in rows], worker) for rows, worker in released.calls] == [
            (["t1"], "w1")
        ]

    run(test)


def test_rows_delivered_to_a_poll_cancelled_before_it_read_them_are_handed_back() -> None:
    async def test() -> None:
        released = Released()
        desk = HandoffDesk(released)
        offer = desk.open("w1", ["a"], 1, LEASE)
        desk.settle(desk.reserve(["a"]), [row("t1")])
        assert desk.close(offer, abandon=True) is None
        await desk.handed_back(5)
        assert [worker for _, worker in released.calls] == ["w1"]

    run(test)


def test_a_closed_or_draining_desk_reserves_nothing() -> None:
    async def test() -> None:
        desk = HandoffDesk(Released())
        offer = desk.open("w1", ["a"], 1, LEASE)
        assert desk.close(offer) is None
        assert desk.reserve(["a"]) == [None]
        desk.open("w2", ["a"], 1, LEASE)
        desk.close_all()
        assert desk.reserve(["a"]) == [None]
        desk.open("w3", ["a"], 1, LEASE)  # a poll arriving while the server drains
        assert desk.reserve(["a"]) == [None]

    run(test)


def test_a_poll_cancelled_while_it_waits_for_its_delivery_hands_the_leases_back() -> None:
    """The poll stopped waiting (woken), asked for its reserved rows, and its call was
    cancelled before they came: the delivery survives the cancellation, and the rows,
    when they come, go back."""

    async def test() -> None:
        released = Released()
        desk = HandoffDesk(released)
        offer = desk.open("w1", ["a"], 1, LEASE)
        chosen = desk.reserve(["a"])
        pending = desk.close(offer)
        assert pending is not None

        async def poll() -> list[Any]:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                desk.close(offer, abandon=True)
                raise

        waiting = asyncio.ensure_future(poll())
        await asyncio.sleep(0)  # let the poll reach its await
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        assert not pending.cancelled()
        desk.settle(chosen, [row("t1")])
        await desk.handed_back(5)
        assert [([r["id"] for r in rows], worker) for rows, worker in released.calls] == [
            (["t1"], "w1")
        ]
        assert released.reasons == [POLL_ENDED]

    run(test)


def test_a_stopping_server_waits_for_reserved_offers_to_settle() -> None:
    async def test() -> None:
        desk = HandoffDesk(Released())
        desk.open("w1", ["a"], 1, LEASE)
        chosen = desk.reserve(["a"])
        stopping = asyncio.ensure_future(desk.handed_back(30))
        await asyncio.sleep(0)
        assert not stopping.done()
        desk.settle(chosen, [row("t1", leased=False)])
        await asyncio.wait_for(stopping, 5)

    run(test)


def test_waiting_for_settlement_is_bounded() -> None:
    """A statement that never returns does not keep a stopping server forever."""

    async def test() -> None:
        desk = HandoffDesk(Released())
        desk.open("w1", ["a"], 1, LEASE)
        desk.reserve(["a"])
        await asyncio.wait_for(desk.handed_back(0.05), 5)

    run(test)
