"""Server addresses, gRPC channel options and the retry schedule, shared by clients and workers.

A client or worker takes one address or several ("host1:50051,host2:50051"). Calls go to
the current address; a transient failure (UNAVAILABLE, DEADLINE_EXCEEDED) moves to the next
one and retries after an exponential backoff with full jitter, so a fleet reconnecting
after a server restart spreads out instead of arriving at once.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Final

from conveyor.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

DEFAULT_SERVER: Final = "localhost:50051"
SERVER_ENV: Final = "CONVEYOR_SERVER"
MESSAGE_BYTES: Final = 64 * 1024 * 1024

CHANNEL_OPTIONS: Final = [
    ("grpc.max_receive_message_length", MESSAGE_BYTES),
    ("grpc.max_send_message_length", MESSAGE_BYTES),
    # Keepalive pings notice a half-open connection (a server that vanished without FIN).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect quickly after a server restart; our own retry loop adds the jitter.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.enable_retries", 0),
]


def parse_addresses(server: str | Sequence[str] | None) -> list[str]:
    """Normalise one address, a comma-separated list, or a sequence; None reads the env."""
    if server is None:
        server = os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    raw = server.split(",") if isinstance(server, str) else list(server)
    addresses = [address.strip() for address in raw if address.strip()]
    if not addresses:
        raise ConfigError("no server address given")
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"server address must be HOST:PORT, got {address!r}")
    return addresses


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """How long to keep retrying transient failures, and how to space the attempts.

    Attributes:
        call_timeout: Deadline of each attempt.
        total_timeout: Give up (ServerUnavailable) once this much time has passed.
        backoff_base: First backoff ceiling; doubles after every failure.
        backoff_cap: Largest backoff ceiling.
    """

    call_timeout: timedelta = timedelta(seconds=10)
    total_timeout: timedelta = timedelta(seconds=30)
    backoff_base: timedelta = timedelta(milliseconds=50)
    backoff_cap: timedelta = timedelta(seconds=2)

    def __post_init__(self) -> None:
        """Reject non-positive durations."""
        for name in ("call_timeout", "total_timeout", "backoff_base", "backoff_cap"):
            if getattr(self, name) <= timedelta(0):
                raise ConfigError(f"{name} must be positive")

    def delays(self) -> Iterator[float]:
        """Seconds to sleep before each retry: exponential ceiling, full jitter."""
        ceiling = self.backoff_base.total_seconds()
        cap = self.backoff_cap.total_seconds()
        while True:
            yield random.uniform(0, ceiling)
            ceiling = min(cap, ceiling * 2)


class AddressRing:
    """The addresses in rotation; `advance` moves to the next after a transient failure."""

    def __init__(self, addresses: Sequence[str]) -> None:
        """Start at a random address so clients spread across servers."""
        self.addresses = list(addresses)
        self._index = random.randrange(len(self.addresses))

    @property
    def current(self) -> str:
        """The address calls go to now."""
        return self.addresses[self._index]

    def advance(self) -> str:
        """Move to the next address and return it."""
        self._index = (self._index + 1) % len(self.addresses)
        return self.current
