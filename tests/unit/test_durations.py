"""Every duration in the public API is a timedelta or a number of seconds, checked alike.

`Task(timeout=5)` and `RetryPolicy(total_timeout=5)` took seconds; `Worker(drain_timeout=5)`,
`worker.stop(5)` and `BreakerPolicy(reset_timeout=5)` did not, and failed later with an
AttributeError (`int` has no `total_seconds`) or a TypeError comparing an int with a
timedelta. Each now takes either, stores a timedelta, and refuses an impossible one with a
ConfigError naming the setting.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import grpc
import pytest

from conveyor import BreakerPolicy, RetryPolicy, Worker
from conveyor.errors import ConfigError
from conveyor.storage.queries import milliseconds
from conveyor.types import LARGEST_DURATION, as_duration


class TestZeroAllowed:
    @pytest.mark.parametrize("value", [0, 0.0, timedelta(0)])
    def test_zero_is_no_time(self, value: object) -> None:
        assert as_duration(value, "drain", ConfigError, zero_allowed=True) == timedelta(0)

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            (-1, "drain must not be negative, got -1 s"),
            (timedelta(seconds=-2), "drain must not be negative, got -2 s"),
            (float("nan"), "drain must be a finite number of seconds, got nan"),
            (1e300, "drain may be at most 36500 days"),
        ],
    )
    def test_what_is_still_refused(self, value: object, message: str) -> None:
        with pytest.raises(ConfigError) as raised:
            as_duration(value, "drain", ConfigError, zero_allowed=True)
        assert raised.value.message.startswith(message)

    def test_without_it_zero_is_refused(self) -> None:
        with pytest.raises(ConfigError, match="drain must be positive, got 0 s"):
            as_duration(0, "drain", ConfigError)


class TestBreakerPolicy:
    def test_reset_timeout_in_seconds(self) -> None:
        assert BreakerPolicy(reset_timeout=2.5).reset_timeout == timedelta(seconds=2.5)
        assert BreakerPolicy(failure_threshold=2, reset_timeout=1) == BreakerPolicy(
            failure_threshold=2, reset_timeout=timedelta(seconds=1)
        )

    @pytest.mark.parametrize(
        ("settings", "message"),
        [
            ({"reset_timeout": -1}, "reset_timeout must be positive, got -1 s"),
            ({"reset_timeout": "5"}, "reset_timeout must be a timedelta or a number of seconds"),
            ({"failure_threshold": 2.5}, "failure_threshold must be a whole number of at least 1"),
            ({"failure_threshold": True}, "failure_threshold must be a whole number of at least 1"),
        ],
    )
    def test_impossible_policies_name_the_setting(
        self, settings: dict[str, object], message: str
    ) -> None:
        with pytest.raises(ConfigError) as raised:
            BreakerPolicy(**settings)  # type: ignore[arg-type]
        assert raised.value.message.startswith(message)


class TestWorkerDurations:
    def test_seconds_are_stored_as_timedeltas(self) -> None:
        worker = Worker("127.0.0.1:1", drain_timeout=0, lease_wait=2.5)
        assert worker.drain_timeout == timedelta(0)
        assert worker.lease_wait == timedelta(seconds=2.5)
        worker.configure(drain_timeout=7)
        assert worker.drain_timeout == timedelta(seconds=7)

    @pytest.mark.parametrize(
        ("settings", "message"),
        [
            ({"drain_timeout": -1}, "drain_timeout must not be negative, got -1 s"),
            ({"lease_wait": 0}, "lease_wait must be positive, got 0 s"),
            ({"lease_wait": float("inf")}, "lease_wait must be a finite number of seconds"),
        ],
    )
    def test_impossible_settings_are_config_errors(
        self, settings: dict[str, object], message: str
    ) -> None:
        with pytest.raises(ConfigError) as raised:
            Worker("127.0.0.1:1", **settings)  # type: ignore[arg-type]
        assert raised.value.message.startswith(message)

    def test_call_timeout_in_seconds_or_as_a_timedelta(self) -> None:
        """Before: a worker's calls had a fixed 10 s deadline, which no setting changed."""
        assert Worker("127.0.0.1:1").call_timeout == timedelta(seconds=10)
        worker = Worker("127.0.0.1:1", call_timeout=2.5)
        assert worker.call_timeout == timedelta(seconds=2.5)
        worker.configure(call_timeout=timedelta(minutes=1))
        assert worker.call_timeout == timedelta(minutes=1)
        worker.configure(concurrency=2)  # None keeps it
        assert worker.call_timeout == timedelta(minutes=1)
        for bound in (0.5, 3600):
            assert Worker("127.0.0.1:1", call_timeout=bound).call_timeout.total_seconds() == bound

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            (0, "call_timeout must be positive, got 0 s"),
            (-1, "call_timeout must be positive, got -1 s"),
            (float("nan"), "call_timeout must be a finite number of seconds, got nan"),
            ("10", "call_timeout must be a timedelta or a number of seconds, not str"),
            (True, "call_timeout must be a timedelta or a number of seconds, not bool"),
            (0.1, "call_timeout must be at least 0.5 s, got 0.1 s"),
            (timedelta(milliseconds=499), "call_timeout must be at least 0.5 s, got 0.499 s"),
            (3601, "call_timeout may be at most 1 hour (3600 s), got 3601 s"),
            # gRPC would have made this a deadline already passed: every call failed at once.
            (1e12, "call_timeout may be at most 1 hour (3600 s)"),
        ],
    )
    def test_impossible_call_timeouts_are_config_errors(self, value: object, message: str) -> None:
        with pytest.raises(ConfigError) as raised:
            Worker("127.0.0.1:1", call_timeout=value)  # type: ignore[arg-type]
        assert raised.value.message.startswith(message), raised.value.message
        worker = Worker("127.0.0.1:1", call_timeout=3)
        with pytest.raises(ConfigError) as raised:
            worker.configure(call_timeout=value)  # type: ignore[arg-type]
        assert raised.value.message.startswith(message), raised.value.message
        assert worker.call_timeout == timedelta(seconds=3)

    def test_start_and_stop_check_their_timeouts_first(self) -> None:
        worker = Worker("127.0.0.1:1")
        worker.register_handler("mine", lambda _ctx, _payload: None)
        with pytest.raises(ConfigError, match="timeout must be positive, got 0 s"):
            worker.start(timeout=0)
        with pytest.raises(ConfigError, match="timeout must not be negative, got -1 s"):
            worker.stop(-1)
        worker.stop(0)  # never started: nothing to stop, and no error
        assert worker.running is False


class TestLongestDurations:
    """Whatever a duration may be, every timer it can reach still takes it.

    Up to 999,999,999 days were accepted, but gRPC makes a deadline absolute nanoseconds
    in an int64 (a call given 1e10 s failed at once with DEADLINE_EXCEEDED) and a thread's
    join raises OverflowError past threading.TIMEOUT_MAX.
    """

    def test_the_largest_duration_is_a_live_grpc_deadline(self) -> None:
        # Port 1 on loopback refuses the connection: a live deadline ends the call with
        # UNAVAILABLE, one that overflowed with DEADLINE_EXCEEDED before it was tried.
        with grpc.insecure_channel("127.0.0.1:1") as channel:
            call = channel.unary_unary("/conveyor.v1.Nothing/Nothing")
            with pytest.raises(grpc.RpcError) as raised:
                call(b"", timeout=LARGEST_DURATION.total_seconds())
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]

    def test_the_largest_duration_is_a_thread_wait(self) -> None:
        assert LARGEST_DURATION.total_seconds() <= threading.TIMEOUT_MAX
        lock = threading.Lock()
        assert lock.acquire(timeout=LARGEST_DURATION.total_seconds())

    @pytest.mark.parametrize("value", [1e10, timedelta(days=40_000)])
    def test_a_longer_one_is_refused(self, value: object) -> None:
        with pytest.raises(ConfigError, match="stop may be at most 36500 days"):
            as_duration(value, "stop", ConfigError)

    def test_a_client_call_timeout_is_at_most_an_hour(self) -> None:
        assert RetryPolicy(call_timeout=3600).call_timeout == timedelta(hours=1)
        with pytest.raises(ConfigError, match="call_timeout may be at most 1 hour"):
            RetryPolicy(call_timeout=3601)
        assert RetryPolicy(total_timeout=timedelta(days=365)).total_timeout.days == 365


class TestPostgresTimeoutSettings:
    """A duration becomes a PostgreSQL timeout setting in whole milliseconds, where 0 means
    no limit: so a positive duration under a millisecond must not round down to none (the
    server's statement timeout used `int()` of it, and 0.4 ms would have meant forever)."""

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (timedelta(0), 0),
            (timedelta(microseconds=400), 1),
            (timedelta(microseconds=1600), 2),
            (timedelta(seconds=30), 30_000),
        ],
    )
    def test_whole_milliseconds(self, value: timedelta, expected: int) -> None:
        assert milliseconds(value) == expected
