"""Wake rounds: a new task wakes the waiting long polls, but not a claim statement each.

Real server, real PostgreSQL, raw gRPC long polls. The fallback poll is set to a minute,
so every lease here comes from a wake-up, never from a poll that happened to run.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from helpers import wait_for
from long_polls import WAITERS, Fleet, claims


@pytest.fixture
def quiet_server(start_server):
    """A server whose fallback poll never fires during a test, and whose enqueues leave
    every task queued for the polls to claim (without handoff: see test_handoff.py)."""
    return start_server(poll_interval=timedelta(minutes=1), handoff=False)


@pytest.fixture
def fleet(quiet_server):
    connected = Fleet(quiet_server.address)
    yield connected
    connected.close()


def test_one_task_costs_one_claim_not_one_per_waiting_poll(quiet_server, fleet) -> None:
    """Eight idle polls, one new task: it is leased once, and the other seven polls go
    back to waiting without running a claim each (without rounds: 7 empty claims per
    wake-up, and an enqueue wakes twice, in-process and through NOTIFY)."""
    polls = [fleet.poll(f"rounds-{n}", "rounds.a") for n in range(WAITERS)]
    # Each poll's first look finds nothing (a claim, or a skip once an earlier poll's claim
    # found the type drained: counted as skipped, which a loaded CI run saw for one of
    # the eight); then all eight are waiting.
    wait_for(
        lambda: (
            sum(claims(quiet_server.http_url).get(key, 0) for key in ("empty", "skipped"))
            >= WAITERS
        ),
        what="every poll to make its first look",
    )
    before = claims(quiet_server.http_url)
    task_id = fleet.enqueue("rounds.a")
    done = wait_for(lambda: [p for p in polls if p.done()] or None, what="the task's lease")
    assert [p.result() for p in done] == [[task_id]]
    # Every poll takes part in the round that leased the task: it claims, or it skips.
    # Without rounds the seven others would have run seven empty claims by then.

    def delta() -> dict[str, float]:
        now = claims(quiet_server.http_url)
        return {key: now.get(key, 0) - before.get(key, 0) for key in ("tasks", "empty", "skipped")}

    def all_took_part() -> dict[str, float] | None:
        now = delta()
        return now if sum(now.values()) >= WAITERS else None

    settled = wait_for(all_took_part, what="every poll to claim or skip")
    assert settled["tasks"] == 1
    # One more claim is allowed: the NOTIFY of the same commit may start a second round.
    assert settled["empty"] <= 1, settled
    assert settled["skipped"] >= WAITERS - 2, settled
    assert sum(p.done() for p in polls) == 1, "a poll returned without a task"


def test_a_poll_for_another_type_is_not_skipped(quiet_server, fleet) -> None:
    """Polls for type a find nothing when a b task arrives; the b poll still gets it at
    once, not at the fallback poll a minute later."""
    a_polls = [fleet.poll(f"rounds-a-{n}", "rounds.a") for n in range(4)]
    b_poll = fleet.poll("rounds-b", "rounds.b")
    wait_for(
        lambda: claims(quiet_server.http_url).get("empty", 0) >= 5,
        what="every poll to make its first, empty claim",
    )
    task_id = fleet.enqueue("rounds.b")
    assert b_poll.result(timeout=10) == [task_id]
    assert not any(p.done() for p in a_polls)


def test_a_stream_of_single_enqueues_is_leased_promptly(quiet_server, fleet) -> None:
    """Tasks enqueued one at a time while polls come and go: each is leased on a wake-up
    (never left for the fallback poll because an earlier round found the queue empty)."""
    leased: list[str] = []
    sent: list[str] = []
    for n in range(20):
        empty_before = claims(quiet_server.http_url).get("empty", 0)
        polls = [fleet.poll(f"stream-{n}-{k}", "rounds.s", max_tasks=1) for k in range(3)]
        wait_for(
            lambda empty_before=empty_before: (
                claims(quiet_server.http_url).get("empty", 0) >= empty_before + 3
            ),
            what="the polls to be waiting",
        )
        sent.append(fleet.enqueue("rounds.s"))
        first = wait_for(lambda polls=polls: [p for p in polls if p.done()] or None, timeout=10)
        leased.extend(first[0].result())
        # The other two polls may take later tasks; end them with a task of their own each.
        rest = [p for p in polls if not p.done()]
        sent.extend(fleet.enqueue("rounds.s") for _ in rest)
        for poll in rest:
            leased.extend(poll.result(timeout=10))
    assert sorted(leased) == sorted(sent)


def test_a_new_poll_after_a_drained_round_waits_without_claiming(quiet_server, fleet) -> None:
    """A worker polls again as soon as it has its leases; when the round that leased them
    found the queue empty, that poll waits for the next wake-up instead of claiming, and
    still gets the next task."""
    first = fleet.poll("again-1", "rounds.r")
    wait_for(lambda: claims(quiet_server.http_url).get("empty", 0) >= 1, what="the first poll")
    task_id = fleet.enqueue("rounds.r")
    assert first.result(timeout=10) == [task_id]  # got 1 of the 4 it asked for: drained
    before = claims(quiet_server.http_url)
    again = fleet.poll("again-1", "rounds.r")
    wait_for(
        lambda: claims(quiet_server.http_url).get("skipped", 0) > before.get("skipped", 0),
        what="the new poll to skip its first claim",
    )
    assert claims(quiet_server.http_url).get("empty", 0) == before.get("empty", 0)
    next_id = fleet.enqueue("rounds.r")
    assert again.result(timeout=10) == [next_id]


def test_an_enqueue_on_one_server_wakes_long_polls_on_another(start_server) -> None:
    """Servers ignore the echo of their own NOTIFY (they woke their polls already), never
    another server's: a task enqueued through A starts on B's poll at once."""
    server_a = start_server(poll_interval=timedelta(minutes=1))
    server_b = start_server(poll_interval=timedelta(minutes=1))
    via_a, via_b = Fleet(server_a.address), Fleet(server_b.address)
    try:
        poll = via_b.poll("other-server", "rounds.x")
        wait_for(lambda: claims(server_b.http_url).get("empty", 0) >= 1, what="B's poll")
        task_id = via_a.enqueue("rounds.x")
        assert poll.result(timeout=10) == [task_id]
    finally:
        via_a.close()
        via_b.close()
