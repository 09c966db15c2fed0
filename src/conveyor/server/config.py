"""ServerConfig: every setting of a server process, validated once, with named defaults.

Only `conveyor.cli` reads the environment; everything else receives this object.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs, urlsplit

from conveyor.auth import is_loopback
from conveyor.errors import ConfigError
from conveyor.monitoring.http import HttpLimits
from conveyor.protocol.limits import MAX_PORT, MIN_SERVER_MESSAGE_BYTES, PEER_MESSAGE_BYTES
from conveyor.server import failpoints
from conveyor.storage.migrate import DEFAULT_LOCK_ATTEMPTS as DEFAULT_MIGRATE_LOCK_ATTEMPTS
from conveyor.storage.migrate import DEFAULT_LOCK_TIMEOUT as DEFAULT_MIGRATE_LOCK_TIMEOUT
from conveyor.types import first_unprintable, printable, utf8_text

if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_GRPC_LISTEN: Final = "127.0.0.1:50051"
DEFAULT_HTTP_LISTEN: Final = "127.0.0.1:8080"
DEFAULT_LEASE_TTL: Final = timedelta(seconds=30)
# How long past an attempt's deadline the server waits for the worker's own timeout report
# before the reaper takes the task back.
DEFAULT_DEADLINE_GRACE: Final = timedelta(seconds=10)
DEFAULT_HEARTBEAT_INTERVAL: Final = timedelta(seconds=3)
# 1 s, 2 s, 4 s ... capped: three retries finish well within a minute.
DEFAULT_RETRY_BACKOFF_BASE: Final = timedelta(seconds=1)
DEFAULT_RETRY_BACKOFF_CAP: Final = timedelta(minutes=5)
DEFAULT_MAX_PAYLOAD_BYTES: Final = 1024 * 1024
# The smallest gRPC message a server sends and receives: room for a client's enqueue request
# (up to 8 MiB) and for batches of leases of ordinary payloads.
MIN_MESSAGE_BYTES: Final = MIN_SERVER_MESSAGE_BYTES
# Room in a message for everything of a task but its payload (or result), which may each be
# up to max_payload_bytes: ids, type, trace context, timestamps.
MESSAGE_OVERHEAD_BYTES: Final = 1024 * 1024
# The largest max_payload_bytes: a message of a task with its largest payload and result must
# fit in what workers and clients accept.
MAX_PAYLOAD_BYTES_LIMIT: Final = (PEER_MESSAGE_BYTES - MESSAGE_OVERHEAD_BYTES) // 2
# Room a message of leases leaves below the gRPC limit. Each lease is counted with its tag and
# length prefix, so this only covers the message's own framing, with plenty to spare.
LEASE_MESSAGE_HEADROOM_BYTES: Final = 64 * 1024
DEFAULT_MAX_BATCH: Final = 1000
DEFAULT_MAX_LEASE_WAIT: Final = timedelta(seconds=30)
DEFAULT_MAX_LEASE_BATCH: Final = 256
DEFAULT_POLL_INTERVAL: Final = timedelta(seconds=1)
DEFAULT_REAPER_INTERVAL: Final = timedelta(seconds=1)
# Five missed heartbeats at the default interval: long enough that a slow network does not
# cause false rescues, short enough to beat the 30 s lease by half.
DEFAULT_WORKER_LOST_AFTER: Final = timedelta(seconds=15)
# A dead leader is replaced within this (plus one campaign interval).
DEFAULT_LEADER_TTL: Final = timedelta(seconds=10)
DEFAULT_LEADER_RETRY_INTERVAL: Final = timedelta(seconds=1)
# Elections and worker heartbeats get their own small pool, so a pool exhausted by
# producers cannot starve them (which would cost workers their leases).
DEFAULT_PRIORITY_POOL_SIZE: Final = 3
DEFAULT_DB_BREAKER_FAILURES: Final = 5
DEFAULT_DB_BREAKER_RESET: Final = timedelta(seconds=2)
DEFAULT_STATS_INTERVAL: Final = timedelta(seconds=5)
DEFAULT_STATEMENT_TIMEOUT: Final = timedelta(seconds=10)
DEFAULT_POOL_ACQUIRE_TIMEOUT: Final = timedelta(seconds=5)
DEFAULT_POOL_MAX_SIZE: Final = 20
DEFAULT_SHUTDOWN_GRACE: Final = timedelta(seconds=10)
# Finished tasks (and their history) are kept this long, then pruned by the leader: long
# enough to inspect last week's failures, short enough that the hot table stays small.
DEFAULT_RETENTION: Final = timedelta(days=7)
DEFAULT_RETENTION_INTERVAL: Final = timedelta(seconds=30)
# Stopped and lost workers are deleted this long after they were last heard from. Every
# worker process registers a fresh id, so without it the table (and `conveyor workers`, and
# the sweeper's scan of it every second) grows for ever; a day keeps a dead worker in view
# long enough to look into it. Tasks keep their worker ids as text, so nothing needs the row.
DEFAULT_WORKER_RETENTION: Final = timedelta(hours=24)
DEFAULT_TOKENS_CHECK_INTERVAL: Final = timedelta(seconds=2)
# Producer and operator requests per second per token, per server process. A client joins
# concurrent enqueues into one request, so this is thousands of tasks a second; it exists
# so one runaway script cannot take a server's whole CPU from everyone else.
DEFAULT_RATE_LIMIT: Final = 2000.0
DEFAULT_RATE_BURST: Final = 4000.0
# Calls in progress on one server (long polls included: one per worker) and HTTP/2 streams
# per connection. Beyond them gRPC answers RESOURCE_EXHAUSTED at once instead of queueing
# without bound.
DEFAULT_MAX_CONCURRENT_RPCS: Final = 10_000
# gRPC keeps the cap in a C int: beyond it the server failed with an OverflowError.
MAX_CONCURRENT_RPCS: Final = 2**31 - 1
DEFAULT_MAX_STREAMS_PER_CONNECTION: Final = 256
# The least: each client keeps an enqueue stream open on its connection, and each worker a
# Work stream, for as long as they run. With one, nothing else got through (a client's
# status call timed out; a worker's heartbeats did, its leases expired and its tasks ran
# again); a few more leave room for the calls beside them.
MIN_STREAMS_PER_CONNECTION: Final = 8
# A token may hold a tenth of a server's call slots with enqueue streams: far more than the
# clients of any one application need (one per Client), and too few to lock workers out.
DEFAULT_MAX_ENQUEUE_STREAMS_PER_TOKEN: Final = 1_000
# An idle client's enqueue stream is ended after this long: long enough that a producer
# enqueueing every few seconds keeps its stream, short enough that clients that went quiet
# (or were dropped unclosed) give their calls back within a minute.
DEFAULT_ENQUEUE_STREAM_IDLE: Final = timedelta(seconds=60)
# HTTP/2 keepalive pings to every peer: one after this long with nothing heard from it, and
# a peer that does not answer within the timeout is gone, its calls with it. A worker whose
# connection died silently (a black hole, a forgotten NAT entry) used to keep its Work
# stream here for half a minute and more, and the stream claimed tasks into it.
DEFAULT_KEEPALIVE_INTERVAL: Final = timedelta(seconds=5)
DEFAULT_KEEPALIVE_TIMEOUT: Final = timedelta(seconds=5)


def default_server_id() -> str:
    """host-pid-random: unique per process, readable in logs."""
    return printable(f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")


# As long as a worker id may be. The id goes into log lines, /status, the leader row and
# `conveyor servers`: one with a newline forged log lines, and one of any length bloated all.
MAX_SERVER_ID_LENGTH: Final = 200


def _check_server_id(server_id: str) -> None:
    if not 1 <= len(server_id) <= MAX_SERVER_ID_LENGTH:
        raise ConfigError(f"server_id must be 1 to {MAX_SERVER_ID_LENGTH} characters")
    if (index := first_unprintable(server_id)) is not None:
        raise ConfigError(
            "server_id must not contain control or format characters (newline, escape, "
            f"bidi override...); it has U+{ord(server_id[index]):04X} at position {index}"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """Settings of one server process. See docs/operations.md for each one."""

    database_url: str
    grpc_listen: str = DEFAULT_GRPC_LISTEN
    http_listen: str | None = DEFAULT_HTTP_LISTEN
    # /metrics on an address of its own (typically internal to the cluster), served without
    # authentication there; None keeps it on http_listen, behind a token when auth is on.
    metrics_listen: str | None = None
    # The /ui dashboard on the HTTP port. It can act (retry, cancel, pause): with a tokens
    # file it asks for a login; without one it is for loopback only (see `exposure_problems`).
    dashboard: bool = True
    # Host names (besides IP addresses and localhost) the dashboard answers to; any other
    # Host header is refused, which defeats DNS rebinding against a loopback dashboard.
    dashboard_allowed_hosts: frozenset[str] = frozenset()
    # What one client may hold on the HTTP and metrics addresses: connections, and how long
    # a request may take to arrive and to be answered (monitoring/http.py).
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    server_id: str = field(default_factory=default_server_id)
    migrate: bool = False
    # With `migrate`: how long each attempt waits for a table lock, and how many attempts
    # (see storage/migrate.py), as `conveyor migrate` does by default.
    migrate_lock_timeout: timedelta = DEFAULT_MIGRATE_LOCK_TIMEOUT
    migrate_lock_attempts: int = DEFAULT_MIGRATE_LOCK_ATTEMPTS
    lease_ttl: timedelta = DEFAULT_LEASE_TTL
    deadline_grace: timedelta = DEFAULT_DEADLINE_GRACE
    heartbeat_interval: timedelta = DEFAULT_HEARTBEAT_INTERVAL
    retry_backoff_base: timedelta = DEFAULT_RETRY_BACKOFF_BASE
    retry_backoff_cap: timedelta = DEFAULT_RETRY_BACKOFF_CAP
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    max_lease_wait: timedelta = DEFAULT_MAX_LEASE_WAIT
    max_lease_batch: int = DEFAULT_MAX_LEASE_BATCH
    poll_interval: timedelta = DEFAULT_POLL_INTERVAL
    reaper_interval: timedelta = DEFAULT_REAPER_INTERVAL
    worker_lost_after: timedelta = DEFAULT_WORKER_LOST_AFTER
    statement_timeout: timedelta = DEFAULT_STATEMENT_TIMEOUT
    pool_acquire_timeout: timedelta = DEFAULT_POOL_ACQUIRE_TIMEOUT
    pool_max_size: int = DEFAULT_POOL_MAX_SIZE
    priority_pool_size: int = DEFAULT_PRIORITY_POOL_SIZE
    shutdown_grace: timedelta = DEFAULT_SHUTDOWN_GRACE
    leader_ttl: timedelta = DEFAULT_LEADER_TTL
    leader_retry_interval: timedelta = DEFAULT_LEADER_RETRY_INTERVAL
    db_breaker_failures: int = DEFAULT_DB_BREAKER_FAILURES
    db_breaker_reset: timedelta = DEFAULT_DB_BREAKER_RESET
    stats_interval: timedelta = DEFAULT_STATS_INTERVAL
    # Concurrent enqueues share one insert and commit (see conveyor/group_commit.py); off only
    # to measure what it gains.
    group_commit: bool = True
    # An enqueue leases its tasks straight to the long polls waiting for them in this
    # server (see server/handoff.py); off only to measure what it gains.
    handoff: bool = True
    # Serve the Work stream (server/work_stream.py); off, workers fall back to LeaseTasks
    # long polls and ReportResults calls, as with a server that predates it. Off only to
    # measure what the stream gains, or to test that fallback.
    work_stream: bool = True
    # Serve EnqueueStream (server/enqueue_stream.py); off, clients fall back to EnqueueTasks
    # calls, as with a server that predates it. Off only to measure what the stream gains,
    # or to test that fallback.
    enqueue_stream: bool = True
    # An enqueue stream with no request for this long is ended OK (server/enqueue_stream.py):
    # idle clients must not hold calls under max_concurrent_rpcs for good.
    enqueue_stream_idle: timedelta = DEFAULT_ENQUEUE_STREAM_IDLE
    # Keepalive pings to clients and workers (see DEFAULT_KEEPALIVE_INTERVAL): a dead peer
    # is noticed within about their sum, and its Work stream ends, leasing no more.
    keepalive_interval: timedelta = DEFAULT_KEEPALIVE_INTERVAL
    keepalive_timeout: timedelta = DEFAULT_KEEPALIVE_TIMEOUT
    # With tokens, the enqueue streams one token may hold open on this server (one per
    # client); a client refused a stream enqueues with calls. None: no cap.
    max_enqueue_streams_per_token: int | None = DEFAULT_MAX_ENQUEUE_STREAMS_PER_TOKEN
    # None: keep finished tasks forever.
    retention: timedelta | None = DEFAULT_RETENTION
    retention_interval: timedelta = DEFAULT_RETENTION_INTERVAL
    # None: keep stopped and lost workers' rows forever.
    worker_retention: timedelta | None = DEFAULT_WORKER_RETENTION
    # Security (docs/security.md). Accepted tokens, re-read when the file changes; None turns
    # authentication off, which only a loopback server or an --insecure one may do.
    tokens_file: Path | None = None
    # The same TOML given as text (CONVEYOR_TOKENS: tokens in the environment, as container
    # platforms hand out secrets); fixed for the process's life. At most one of the two.
    tokens_toml: str | None = None
    # None: no metering (see server/security.py for what is metered and why).
    rate_limit: float | None = DEFAULT_RATE_LIMIT
    rate_burst: float = DEFAULT_RATE_BURST
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS
    max_streams_per_connection: int = DEFAULT_MAX_STREAMS_PER_CONNECTION
    # How soon a change to the tokens file takes effect (one stat() per interval).
    tokens_check_interval: timedelta = DEFAULT_TOKENS_CHECK_INTERVAL
    # TLS for gRPC and HTTP: a PEM certificate chain and its key. With a client CA, gRPC
    # clients must present a certificate it signed (mutual TLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Serve on a non-loopback address without TLS or tokens anyway (a trusted network).
    insecure: bool = False
    # Signs dashboard session cookies. Servers behind one load balancer need the same one;
    # None draws a random one at start-up (sessions then end when the server restarts).
    session_secret: bytes | None = None
    # Test-only crash points (see server/failpoints.py); empty in production.
    failpoints: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        """Reject impossible combinations before anything starts."""
        if not self.database_url:
            raise ConfigError("database_url is required")
        check_database_url(self.database_url)
        _check_server_id(self.server_id)
        # Host headers are compared in lower case, without a trailing dot; a name listed
        # as "Queue.Internal" opened the dashboard but got 421 on /status and /metrics. A
        # list in one string, commas or spaces between (CONVEYOR_SERVER's form), is split:
        # kept whole, it matched no name, and every name in it was refused.
        object.__setattr__(
            self,
            "dashboard_allowed_hosts",
            frozenset(
                name.lower().rstrip(".")
                for entry in self.dashboard_allowed_hosts
                for name in re.split(r"[\s,]+", entry)
                if name.strip(".")
            ),
        )
        self._check_durations()
        self._check_counts()
        unknown = self.failpoints - failpoints.KNOWN
        if unknown:
            raise ConfigError(f"unknown failpoints: {', '.join(sorted(unknown))}")
        for address in (self.grpc_listen, self.http_listen, self.metrics_listen):
            if address is not None:
                split_host_port(address)
        if self.tokens_file is not None and self.tokens_toml is not None:
            raise ConfigError("give tokens as a file or in the environment, not both")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("TLS needs both a certificate and its key")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("a client CA (mutual TLS) needs the server's own certificate too")
        problems = self.exposure_problems()
        if problems and not self.insecure:
            raise ConfigError(
                "; ".join(problems) + ". Configure TLS (--tls-cert, --tls-key) and tokens "
                "(--tokens-file), or pass --insecure if this network is trusted"
            )

    @property
    def max_message_bytes(self) -> int:
        """The gRPC send and receive limit: a whole task and its result fit in one message."""
        return max(MIN_MESSAGE_BYTES, self.max_payload_bytes * 2 + MESSAGE_OVERHEAD_BYTES)

    @property
    def lease_message_bytes(self) -> int:
        """How many bytes of leases one message may carry, safely within `max_message_bytes`.

        A claim takes up to `max_lease_batch` tasks, no more than fit this many bytes (the
        oldest always: one lease always fits), and its leases travel in as many messages
        as this allows should the estimate fall short.
        """
        return self.max_message_bytes - LEASE_MESSAGE_HEADROOM_BYTES

    @property
    def tls(self) -> bool:
        """Whether gRPC and HTTP are served over TLS."""
        return self.tls_cert_file is not None

    @property
    def authentication(self) -> bool:
        """Whether callers must present a token."""
        return self.tokens_file is not None or self.tokens_toml is not None

    def exposure_problems(self) -> list[str]:
        """Why this server would be unsafe to run as configured; empty when it is not.

        A server reachable from other machines must encrypt (tokens and payloads cross the
        network) and authenticate (whoever can enqueue or report controls the fleet). On
        loopback neither is required: that is `conveyor dev` and a developer's laptop.
        """
        exposed = [
            f"{what} listens on {address}, which is not a loopback address"
            for what, address in (
                ("gRPC", self.grpc_listen),
                ("HTTP", self.http_listen),
                ("metrics", self.metrics_listen),
            )
            if address is not None and not is_loopback(split_host_port(address)[0])
        ]
        if not exposed:
            return []
        missing = [
            name
            for name, present in (("TLS", self.tls), ("authentication", self.authentication))
            if not present
        ]
        if not missing:
            return []
        # One sentence: "... not a loopback address, and the server has no TLS or authentication".
        return [*exposed[:-1], f"{exposed[-1]}, and the server has no {' or '.join(missing)}"]

    def _check_durations(self) -> None:
        positive = {
            "lease_ttl": self.lease_ttl,
            "heartbeat_interval": self.heartbeat_interval,
            "retry_backoff_base": self.retry_backoff_base,
            "poll_interval": self.poll_interval,
            "reaper_interval": self.reaper_interval,
            "worker_lost_after": self.worker_lost_after,
            "statement_timeout": self.statement_timeout,
            "pool_acquire_timeout": self.pool_acquire_timeout,
            "leader_ttl": self.leader_ttl,
            "leader_retry_interval": self.leader_retry_interval,
            "db_breaker_reset": self.db_breaker_reset,
            "stats_interval": self.stats_interval,
            "retention_interval": self.retention_interval,
            "tokens_check_interval": self.tokens_check_interval,
            "enqueue_stream_idle": self.enqueue_stream_idle,
            "keepalive_interval": self.keepalive_interval,
            "keepalive_timeout": self.keepalive_timeout,
            "migrate_lock_timeout": self.migrate_lock_timeout,
        }
        for name, value in positive.items():
            if value <= timedelta(0):
                raise ConfigError(f"{name} must be positive")
        if self.deadline_grace < timedelta(0) or self.max_lease_wait < timedelta(0):
            raise ConfigError("deadline_grace and max_lease_wait must not be negative")
        if self.retry_backoff_cap < self.retry_backoff_base:
            raise ConfigError("retry_backoff_cap must be at least retry_backoff_base")
        check_heartbeat_interval(self.heartbeat_interval, self.lease_ttl)
        check_worker_lost_after(self.worker_lost_after, self.heartbeat_interval)
        if self.retention is not None and self.retention <= timedelta(0):
            raise ConfigError(
                f"retention must be positive, got {self.retention} (a value too small for a "
                "microsecond rounds to 0); to keep finished tasks for good: retention=None, "
                "--retention-days 0"
            )
        if self.worker_retention is not None and self.worker_retention <= timedelta(0):
            raise ConfigError(
                f"worker_retention must be positive, got {self.worker_retention}; to keep "
                "stopped and lost workers for good: worker_retention=None, "
                "--worker-retention-hours 0"
            )
        if self.leader_retry_interval >= self.leader_ttl:
            raise ConfigError("leader_retry_interval must be shorter than leader_ttl")

    def _check_counts(self) -> None:
        if self.max_payload_bytes > MAX_PAYLOAD_BYTES_LIMIT:
            raise ConfigError(
                f"max_payload_bytes must be at most {MAX_PAYLOAD_BYTES_LIMIT} "
                f"({MAX_PAYLOAD_BYTES_LIMIT / (1024 * 1024):g} MiB): a task with its payload "
                "and its result must fit in one message a worker accepts (store larger "
                "payloads elsewhere and pass a key)"
            )
        for name, number in (
            ("max_payload_bytes", self.max_payload_bytes),
            ("max_batch", self.max_batch),
            ("max_lease_batch", self.max_lease_batch),
            ("pool_max_size", self.pool_max_size),
            ("priority_pool_size", self.priority_pool_size),
            ("db_breaker_failures", self.db_breaker_failures),
            ("max_concurrent_rpcs", self.max_concurrent_rpcs),
            ("migrate_lock_attempts", self.migrate_lock_attempts),
        ):
            if number < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.max_concurrent_rpcs > MAX_CONCURRENT_RPCS:
            raise ConfigError(f"max_concurrent_rpcs must be at most {MAX_CONCURRENT_RPCS}")
        if self.max_streams_per_connection < MIN_STREAMS_PER_CONNECTION:
            raise ConfigError(
                f"max_streams_per_connection must be at least {MIN_STREAMS_PER_CONNECTION}: "
                "every client and worker keeps a stream open on its connection, and calls "
                "beside it need room"
            )
        streams_cap = self.max_enqueue_streams_per_token
        if streams_cap is not None and streams_cap < 1:
            raise ConfigError("max_enqueue_streams_per_token must be at least 1 (None: no cap)")
        if self.rate_limit is not None and (self.rate_limit <= 0 or self.rate_burst < 1):
            raise ConfigError("rate_limit must be positive and rate_burst at least 1")


def check_heartbeat_interval(
    heartbeat_interval: timedelta,
    lease_ttl: timedelta,
    *,
    names: tuple[str, str] = ("heartbeat_interval", "lease_ttl"),
    unit: str = "s",
) -> None:
    """ConfigError unless the heartbeat interval is at most half of the lease TTL.

    `names` and `unit`: how the two were given, for the message (the CLI names its flags,
    which take plain seconds).
    """
    if heartbeat_interval * 2 > lease_ttl:
        interval_name, ttl_name = names
        raise ConfigError(
            f"{interval_name} ({heartbeat_interval.total_seconds():g}{unit}) must be at most "
            f"half of {ttl_name} ({lease_ttl.total_seconds():g}{unit}), or a single lost "
            "heartbeat would cost a worker its leases"
        )


def default_worker_lost_after(heartbeat_interval: timedelta) -> timedelta:
    """worker_lost_after when not given: 15 s, or five heartbeat intervals if longer.

    Five beats, as the defaults are (3 s and 15 s), so that a raised interval raises it
    with it.
    """
    return max(DEFAULT_WORKER_LOST_AFTER, heartbeat_interval * 5)


def check_worker_lost_after(
    worker_lost_after: timedelta,
    heartbeat_interval: timedelta,
    *,
    names: tuple[str, str] = ("worker_lost_after", "heartbeat_interval"),
    unit: str = "s",
) -> None:
    """ConfigError unless a worker is lost only after at least two heartbeat intervals.

    A heartbeat interval raised past worker_lost_after (operations.md advises raising it
    for thousands of workers) made the sweeper mark every healthy worker lost between two
    of its heartbeats: its leases were taken back and its tasks ran again, until their
    attempts ran out.
    """
    if worker_lost_after < heartbeat_interval * 2:
        lost_name, interval_name = names
        raise ConfigError(
            f"{lost_name} ({worker_lost_after.total_seconds():g}{unit}) must be at least "
            f"twice {interval_name} ({heartbeat_interval.total_seconds():g}{unit}), or a "
            "worker that is alive would be marked lost between two of its heartbeats"
        )


def split_host_port(address: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 hosts in brackets), or raise ConfigError."""
    host, sep, port = address.rpartition(":")
    # ASCII digits only: str.isdigit() takes "²", which int() refuses (a traceback), and
    # "٨٠", which it reads as 80.
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= MAX_PORT:
        raise ConfigError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - ":PORT" means all interfaces


DATABASE_URL_FORM: Final = (
    "postgresql://[USER[:PASSWORD]@][HOST][:PORT][/DATABASE][?OPTION=VALUE&...]"
)


def check_database_url(url: str) -> None:
    """Raise ConfigError for a database URL no connection could use, before anything starts.

    asyncpg reads the URL only when it connects, and reports most mistakes then (the server
    and `conveyor migrate` make those a ConfigError too, see server/database.py): this
    checks the form, so a command fails before it does anything else, and the ports, which
    asyncpg takes modulo 65536 (port 99999 connected to port 34463). The messages never
    repeat the URL: it may hold a password.
    """
    utf8_text(url, "the database URL")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed [ of an IPv6 host
        raise ConfigError(f"invalid database URL: {exc}") from None
    if parts.scheme.lower() not in {"postgresql", "postgres"}:
        raise ConfigError(f"invalid database URL: expected {DATABASE_URL_FORM}")
    ports = [_port_of(host) for host in parts.netloc.rpartition("@")[2].split(",")]
    for value in parse_qs(parts.query).get("port", []):
        ports.extend(value.split(","))
    for port in ports:
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= MAX_PORT):
            raise ConfigError(
                f"invalid database URL: port {port!r} is not a number from 1 to {MAX_PORT}"
            )


def _port_of(host: str) -> str:
    """The port of one HOST[:PORT] of a URL ("" when none), IPv6 hosts in brackets."""
    if host.startswith("["):
        after = host.partition("]")[2]
        return after[1:] if after.startswith(":") else ""
    return host.rpartition(":")[2] if ":" in host else ""
