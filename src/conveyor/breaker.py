"""CircuitBreaker: stop calling a server that keeps failing, and probe it again later.

One breaker per server address in clients and workers, and one around the database in the
server. Only failures that mean "unreachable" count (UNAVAILABLE, DEADLINE_EXCEEDED, a
refused connection); an answer of any kind, even an error status, proves the peer is up.

    closed --failure_threshold consecutive failures--> open
    open --reset_timeout elapsed--> half-open (one probe call is let through)
    half-open --probe succeeds--> closed
    half-open --probe fails--> open (for another reset_timeout)
    half-open --probe abandoned (its caller gave up first)--> half-open, the next call probes

`allow` hands each call it lets through a `Permit`, and the call's outcome is recorded with
it: the probe's permit is its own, so only the probe settles the half-open state. A call
that may wait a long time before its answer (a long poll, a stream's opening) asks with
`probe=False`: it goes out only while the breaker is closed, and leaves the probe to a
short call. As the probe it held the half-open state for as long as it waited (up to a
long poll's 20 s), and every other call to the peer was refused meanwhile. Once the
breaker has opened, the outcomes of calls let through before (still in flight then) change
nothing: an abandoned one used to free the probe's place while the probe still ran, and a
second probe went out beside it.

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
from conveyor.types import as_duration

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_RESET_TIMEOUT = timedelta(seconds=5)


class BreakerState(enum.StrEnum):
    """Where a breaker is in its cycle."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# init=False: the constructor takes seconds as well as a timedelta, as RetryPolicy does,
# and stores a timedelta.
@dataclass(frozen=True, slots=True, init=False)
class BreakerPolicy:
    """When a breaker opens and how long it stays open.

    Attributes:
        failure_threshold: Consecutive failures that open the breaker (at least 1).
        reset_timeout: How long it stays open before a probe; a timedelta or seconds.
    """

    failure_threshold: int
    reset_timeout: timedelta

    def __init__(
        self,
        *,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        reset_timeout: timedelta | float = DEFAULT_RESET_TIMEOUT,
    ) -> None:
        """ConfigError for a threshold below one or an impossible timeout."""
        if (
            isinstance(failure_threshold, bool)
            or not isinstance(failure_threshold, int)
            or failure_threshold < 1
        ):
            raise ConfigError(
                f"failure_threshold must be a whole number of at least 1, got {failure_threshold!r}"
            )
        object.__setattr__(self, "failure_threshold", failure_threshold)
        object.__setattr__(
            self, "reset_timeout", as_duration(reset_timeout, "reset_timeout", ConfigError)
        )


class Permit:
    """Leave for one call, from `CircuitBreaker.allow`; its outcome is recorded with it.

    Compared by identity. Calls let through while the breaker is closed share one permit (the
    hot path allocates nothing); each probe gets a new one, which the breaker keeps while
    the probe is in flight.
    """

    __slots__ = ()


# The permit of every call let through while a breaker is closed.
_CLOSED = Permit()


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
        self._probe: Permit | None = None

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

    def probe_free(self) -> bool:
        """Whether a call asking now would be the probe: half-open, and no probe in flight.

        `state` says half-open whether or not another call already holds the probe.
        """
        with self._lock:
            return self._current_state() is BreakerState.HALF_OPEN and self._probe is None

    def allow(self, *, probe: bool = True) -> Permit | None:
        """A permit for a call to go out now, or None; in half-open, one probe at a time.

        `probe=False`: only while closed (the call would hold the probe's place too long).
        """
        with self._lock:
            state = self._current_state()
            if state is BreakerState.CLOSED:
                return _CLOSED
            if probe and state is BreakerState.HALF_OPEN and self._probe is None:
                self._state = BreakerState.HALF_OPEN
                self._probe = Permit()
                return self._probe
            return None

    def record_success(self, permit: Permit) -> None:
        """The peer answered the call `permit` let through: close the breaker."""
        with self._lock:
            if not self._settles(permit):
                return
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._probe = None

    def record_abandoned(self, permit: Permit) -> None:
        """The call ended before any answer (its caller was cancelled): nothing was learned.

        If it was the probe, its place is freed, so that the next call probes. Without this a
        cancelled probe left the breaker half-open with a probe "in flight" for ever, and
        refused every call to the peer from then on.
        """
        with self._lock:
            if permit is self._probe:
                self._probe = None

    def record_failure(self, permit: Permit) -> None:
        """The peer could not be reached; open after enough consecutive failures."""
        with self._lock:
            if not self._settles(permit):
                return
            self._failures += 1
            probing = permit is self._probe
            self._probe = None
            if probing or self._failures >= self.policy.failure_threshold:
                self._state = BreakerState.OPEN
                self._opened_at = self._clock()

    def _settles(self, permit: Permit) -> bool:
        """Whether the outcome of the call `permit` let through may move the breaker.

        When closed, every call's does; otherwise only the probe's. A call let through
        before the breaker opened tells of the peer as it was then: the breaker has since
        opened on later failures, and its probe is what finds out whether the peer is back.
        """
        return permit is self._probe or self._state is BreakerState.CLOSED
