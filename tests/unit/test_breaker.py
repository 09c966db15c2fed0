"""The circuit breaker's state machine, driven by a fake clock."""

from __future__ import annotations

from datetime import timedelta

import pytest

from conveyor.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from conveyor.errors import ConfigError


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


class TestCircuitBreaker:
    def test_stays_closed_below_the_threshold(self, breaker: CircuitBreaker) -> None:
        """Two failures out of a threshold of three keep calls flowing."""
        breaker.record_failure()
        breaker.record_failure()
        assert breaker.state is BreakerState.CLOSED
        assert breaker.allow()

    def test_opens_after_consecutive_failures_and_fails_fast(self, breaker: CircuitBreaker) -> None:
        """Three consecutive failures open it; calls are refused until the timeout."""
        for _ in range(3):
            breaker.record_failure()
        assert breaker.state is BreakerState.OPEN
        assert not breaker.allow()
        assert breaker.retry_in() == pytest.approx(10)

    def test_a_success_resets_the_count(self, breaker: CircuitBreaker) -> None:
        """Failures must be consecutive: a success in between starts the count again."""
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
        breaker.record_failure()
        breaker.record_failure()
        assert breaker.state is BreakerState.CLOSED

    def test_half_open_lets_exactly_one_probe_through(
        self, breaker: CircuitBreaker, clock: FakeClock
    ) -> None:
        """After the reset timeout one call probes; others still fail fast."""
        for _ in range(3):
            breaker.record_failure()
        clock.now += 10
        assert breaker.state is BreakerState.HALF_OPEN
        assert breaker.allow()
        assert not breaker.allow()

    def test_successful_probe_closes(self, breaker: CircuitBreaker, clock: FakeClock) -> None:
        """A probe that gets an answer closes the breaker."""
        for _ in range(3):
            breaker.record_failure()
        clock.now += 10
        assert breaker.allow()
        breaker.record_success()
        assert breaker.state is BreakerState.CLOSED
        assert breaker.allow()

    def test_failed_probe_reopens_for_a_full_timeout(
        self, breaker: CircuitBreaker, clock: FakeClock
    ) -> None:
        """One failed probe is enough to open again, and the timer restarts."""
        for _ in range(3):
            breaker.record_failure()
        clock.now += 10
        assert breaker.allow()
        breaker.record_failure()
        assert breaker.state is BreakerState.OPEN
        clock.now += 9
        assert not breaker.allow()
        clock.now += 1
        assert breaker.allow()

    @pytest.mark.parametrize(
        "settings", [{"failure_threshold": 0}, {"reset_timeout": timedelta(0)}]
    )
    def test_invalid_policies_are_rejected(self, settings: dict[str, object]) -> None:
        """A threshold below one or a zero timeout is a configuration error."""
        with pytest.raises(ConfigError):
            BreakerPolicy(**settings)  # type: ignore[arg-type]
