"""CircuitBreaker: stop calling a server that keeps failing, and probe it again later.

One breaker per server address in clients and workers, and one around the database in the
server. Only failures that mean "unreachable" count (UNAVAILABLE, DEADLINE_EXCEEDED, a
refused connection); an answer of any kind, even an error status, proves the peer is up.

    closed --failure_threshold consecutive failures--> open
    open --reset_timeout elapsed--> half-open (one probe call is let through)
    half-open --probe succeeds--> closed
    half-open --probe fails--> open (for another reset_timeout)
    half-open --probe abandoned (its caller gave up first)--> half-open, the next call probes

Thread-safe: the sync Client may be shared by threads.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from conveyor.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_RESET_TIMEOUT = timedelta(seconds=5)


class BreakerState(enum.StrEnum):
    """Where a breaker is in its cycle."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerPolicy:
    """When a breaker opens and how long it stays open."""

    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    reset_timeout: timedelta = DEFAULT_RESET_TIMEOUT

    def __post_init__(self) -> None:
        """Reject thresholds below one and non-positive timeouts."""
        if self.failure_threshold < 1:
            raise ConfigError("failure_threshold must be at least 1")
        if self.reset_timeout <= timedelta(0):
            raise ConfigError("reset_timeout must be positive")


class CircuitBreaker:
    """Counts consecutive failures to one peer and fails fast while it is open."""

    def __init__(
        self, policy: BreakerPolicy | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Start closed."""
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose timeout passed reports half-open)."""
        with self._lock:
            return self._current_state()

    def _current_state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._retry_in_locked() <= 0:
            return BreakerState.HALF_OPEN
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it would now)."""
        with self._lock:
            return self._retry_in_locked()

    def _retry_in_locked(self) -> float:
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.policy.reset_timeout.total_seconds() - self._clock())

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open, only one probe at a time."""
        with self._lock:
            state = self._current_state()
            if state is BreakerState.CLOSED:
                return True
            if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
                self._state = BreakerState.HALF_OPEN
                self._probe_in_flight = True
                return True
            return False

    def record_success(self) -> None:
        """The peer answered: close the breaker."""
        with self._lock:
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._probe_in_flight = False

    def record_abandoned(self) -> None:
        """The call ended before any answer (its caller was cancelled): nothing was learned.

        A probe in flight is released, so that the next call probes. Without this a
        cancelled probe left the breaker half-open with a probe "in flight" for ever, and
        refused every call to the peer from then on.
        """
        with self._lock:
            self._probe_in_flight = False

    def record_failure(self) -> None:
        """The peer could not be reached; open after enough consecutive failures."""
        with self._lock:
            self._failures += 1
            probing = self._state is BreakerState.HALF_OPEN
            self._probe_in_flight = False
            if probing or self._failures >= self.policy.failure_threshold:
                self._state = BreakerState.OPEN
                self._opened_at = self._clock()
