"""The circuit breaker's state machine, driven by a fake clock; and how backpressure meets it."""

from __future__ import annotations

import sys
import threading
from datetime import timedelta

import grpc
import pytest

from conveyor.breaker import BreakerPolicy, BreakerState, CircuitBreaker, Permit
from conveyor.client.channel import AddressRing, RetryLoop, RetryPolicy
from conveyor.errors import ConfigError, InvalidTask, LimitExceeded


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    policy = BreakerPolicy(failure_threshold=3, reset_timeout=timedelta(seconds=10))
    return CircuitBreaker(policy, clock=clock)


def let_through(breaker: CircuitBreaker) -> Permit:
    """The permit of a call the breaker must let through."""
    permit = breaker.allow()
    assert permit is not None
    return permit


def fail_calls(breaker: CircuitBreaker, count: int) -> None:
    """`count` calls, each let through and failed in turn."""
    for _ in range(count):
        breaker.record_failure(let_through(breaker))


def open_and_time_out(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """Open the breaker (threshold 3) and let its reset timeout (10 s) pass."""
    fail_calls(breaker, 3)
    clock.now += 10


class TestCircuitBreaker:
    def test_stays_closed_below_the_threshold(self, breaker: CircuitBreaker) -> None:
        """Two failures out of a threshold of three keep calls flowing."""
        fail_calls(breaker, 2)
        assert breaker.state is BreakerState.CLOSED
        assert breaker.allow() is not None

    def test_opens_after_consecutive_failures_and_fails_fast(self, breaker: CircuitBreaker) -> None:
        """Three consecutive failures open it; calls are refused until the timeout."""
        fail_calls(breaker, 3)
        assert breaker.state is BreakerState.OPEN
        assert breaker.allow() is None
        assert breaker.retry_in() == pytest.approx(10)

    def test_a_success_resets_the_count(self, breaker: CircuitBreaker) -> None:
        """Failures must be consecutive: a success in between starts the count again."""
        fail_calls(breaker, 2)
        breaker.record_success(let_through(breaker))
        fail_calls(breaker, 2)
        assert breaker.state is BreakerState.CLOSED

    def test_half_open_lets_exactly_one_probe_through(
        self, breaker: CircuitBreaker, clock: FakeClock
    ) -> None:
        """After the reset timeout one call probes; others still fail fast."""
        open_and_time_out(breaker, clock)
        assert breaker.state is BreakerState.HALF_OPEN
        assert breaker.allow() is not None
        assert breaker.allow() is None

    def test_successful_probe_closes(self, breaker: CircuitBreaker, clock: FakeClock) -> None:
        """A probe that gets an answer closes the breaker."""
        open_and_time_out(breaker, clock)
        breaker.record_success(let_through(breaker))
        assert breaker.state is BreakerState.CLOSED
        assert breaker.allow() is not None

    def test_failed_probe_reopens_for_a_full_timeout(
        self, breaker: CircuitBreaker, clock: FakeClock
    ) -> None:
        """One failed probe is enough to open again, and the timer restarts."""
        open_and_time_out(breaker, clock)
        breaker.record_failure(let_through(breaker))
        assert breaker.state is BreakerState.OPEN
        clock.now += 9
        assert breaker.allow() is None
        clock.now += 1
        assert breaker.allow() is not None

    def test_an_abandoned_probe_lets_the_next_call_probe(
        self, breaker: CircuitBreaker, clock: FakeClock
    ) -> None:
        """A probe whose caller gave up taught nothing: the next call probes instead.
        Before record_abandoned, the breaker waited for the lost probe's verdict for ever."""
        open_and_time_out(breaker, clock)
        probe = let_through(breaker)
        assert breaker.allow() is None
        breaker.record_abandoned(probe)
        assert breaker.state is BreakerState.HALF_OPEN
        second_probe = let_through(breaker)
        assert breaker.allow() is None
        breaker.record_success(second_probe)
        assert breaker.state is BreakerState.CLOSED

    def test_an_abandoned_call_that_was_not_the_probe_leaves_the_probe_alone(
        self, breaker: CircuitBreaker, clock: FakeClock
    ) -> None:
        """A call let through before the breaker opened, and given up while the probe runs,
        must not free the probe's place. It did (record_abandoned freed whatever probe was in
        flight), and the next call went out as a second probe beside the first."""
        slow = let_through(breaker)
        open_and_time_out(breaker, clock)
        probe = let_through(breaker)
        breaker.record_abandoned(slow)
        assert breaker.allow() is None
        breaker.record_success(probe)
        assert breaker.state is BreakerState.CLOSED

    def test_outcomes_of_calls_from_before_the_breaker_opened_leave_the_probe_to_decide(
        self, breaker: CircuitBreaker, clock: FakeClock
    ) -> None:
        """A late failure of a call let through while closed used to open the half-open
        breaker again and free the probe's place (a second probe went out a timeout later,
        the first one still running); a late success closed it. Only the probe decides."""
        late_failure, late_success = let_through(breaker), let_through(breaker)
        open_and_time_out(breaker, clock)
        probe = let_through(breaker)
        breaker.record_failure(late_failure)
        breaker.record_success(late_success)
        assert breaker.state is BreakerState.HALF_OPEN
        assert breaker.allow() is None
        breaker.record_failure(probe)
        assert breaker.state is BreakerState.OPEN
        assert breaker.retry_in() == pytest.approx(10)

    def test_a_settled_probe_counts_as_any_call_afterwards(
        self, breaker: CircuitBreaker, clock: FakeClock
    ) -> None:
        """A Work stream records its opening (the probe's success) and later how it broke,
        with the same permit: the later failure counts like any call's."""
        open_and_time_out(breaker, clock)
        stream = let_through(breaker)
        breaker.record_success(stream)
        breaker.record_abandoned(stream)  # frees no probe: there is none
        fail_calls(breaker, 2)
        breaker.record_failure(stream)
        assert breaker.state is BreakerState.OPEN

    @pytest.mark.parametrize(
        "settings", [{"failure_threshold": 0}, {"reset_timeout": timedelta(0)}]
    )
    def test_invalid_policies_are_rejected(self, settings: dict[str, object]) -> None:
        """A threshold below one or a zero timeout is a configuration error."""
        with pytest.raises(ConfigError):
            BreakerPolicy(**settings)  # type: ignore[arg-type]


class _Refusal(grpc.RpcError):
    """A call's error status as grpc raises it: what RetryLoop.failed is handed."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class TestBackpressureAndTheBreaker:
    def test_a_probe_answered_not_now_closes_the_breaker(self, clock: FakeClock) -> None:
        """The server answered, so it is reachable: a probe must not stay in flight for ever."""
        ring = AddressRing(["a:1"])
        ring.breakers["a:1"] = CircuitBreaker(
            BreakerPolicy(failure_threshold=1, reset_timeout=timedelta(seconds=1)), clock=clock
        )
        first = ring.pick()
        assert first is not None
        ring.record(first, reachable=False)
        assert ring.pick() is None  # open
        clock.now += 2
        loop = RetryLoop(ring, RetryPolicy(), "GetTask", clock=clock)
        probe, _ = loop.step()
        assert probe is not None
        assert probe.address == "a:1"  # the half-open probe
        loop.failed(
            probe,
            _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!"),
        )
        assert ring.breakers["a:1"].state is BreakerState.CLOSED
        after = ring.pick()
        assert after is not None
        assert after.address == "a:1"

    def test_backpressure_is_retried_then_raised_as_limit_exceeded(self, clock: FakeClock) -> None:
        ring = AddressRing(["a:1"])
        loop = RetryLoop(
            ring, RetryPolicy(total_timeout=timedelta(seconds=1)), "GetTask", clock=clock
        )
        refusal = _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "request rate limit of 1/s")
        pick = ring.pick()
        assert pick is not None
        loop.failed(pick, refusal)  # within the budget: retried
        clock.now += 5
        with pytest.raises(LimitExceeded, match="request rate limit"):
            loop.failed(pick, refusal)
        # A message too large for gRPC is RESOURCE_EXHAUSTED too, but no retry will help:
        # the request is invalid for that server.
        with pytest.raises(InvalidTask, match="larger than max"):
            RetryLoop(ring, RetryPolicy(), "EnqueueTasks", clock=clock).failed(
                pick,
                _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"),
            )


class TestAddressRingAcrossThreads:
    THREADS = 8
    CALLS = 3000

    def test_every_probe_is_settled_on_the_address_it_was_let_through(self) -> None:
        """Threads sharing a sync Client pick an address, call it and record the outcome.
        `pick` once read the rotation again after the breaker's `allow`: another thread's
        move in between recorded the outcome against another address, and left the first
        breaker's probe in flight for good (the address was never called again). Here
        every outcome is recorded against the picked address, as the clients do; at the
        end every breaker that is not open must let a call through. Before the fix 19 of
        20 runs ended with a breaker refusing every call."""
        addresses = ["a:1", "b:2", "c:3"]
        # Failures open a breaker at once and it half-opens at once: a probe is in flight
        # most of the time, the state in which a lost verdict shuts an address out.
        policy = BreakerPolicy(failure_threshold=1, reset_timeout=timedelta(microseconds=1))
        ring = AddressRing(addresses, policy)

        def calls(seed: int) -> None:
            for call in range(self.CALLS):
                pick = ring.pick()
                if pick is not None:
                    # Fail every third call: each opens its breaker, which half-opens.
                    ring.record(pick, reachable=(call + seed) % 3 != 0)

        threads = [threading.Thread(target=calls, args=(n,)) for n in range(self.THREADS)]
        previous = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as possible
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        finally:
            sys.setswitchinterval(previous)
        assert not any(thread.is_alive() for thread in threads)
        # The reset timeout (1 µs) has passed: an open breaker lets a probe through now.
        stuck = [address for address in addresses if ring.breakers[address].allow() is None]
        assert stuck == []


def test_a_call_that_may_not_probe_goes_out_only_while_closed() -> None:
    """A long poll asks with probe=False: it never holds the half-open probe's place, which
    a short call (a heartbeat) takes; once that probe closes the breaker, it goes out."""
    now = [0.0]
    breaker = CircuitBreaker(
        BreakerPolicy(failure_threshold=1, reset_timeout=5), clock=lambda: now[0]
    )
    assert breaker.allow(probe=False) is not None
    breaker.record_failure(breaker.allow())
    assert breaker.allow(probe=False) is None  # open
    now[0] = 5.0
    assert breaker.allow(probe=False) is None  # half-open: the place stays free
    probe = breaker.allow()
    assert probe is not None
    breaker.record_success(probe)
    assert breaker.allow(probe=False) is not None


def test_probe_free_only_while_half_open_with_no_probe_in_flight(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    """`state` says half-open whether or not a probe is out; `probe_free` tells them apart
    (a worker asks for a heartbeat to probe only when it would be the probe)."""
    assert not breaker.probe_free()  # closed
    for _ in range(3):
        breaker.record_failure(let_through(breaker))
    assert not breaker.probe_free()  # open
    clock.now += 10
    assert breaker.probe_free()
    probe = let_through(breaker)
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.probe_free()
    breaker.record_abandoned(probe)
    assert breaker.probe_free()
