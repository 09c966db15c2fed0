"""Every Prometheus metric a worker exports, and the HTTP endpoint that serves them.

Each Worker has its own registry (not the global default), so several workers can live in
one process, as they do in tests, and an application can serve a worker's registry itself.
`MetricsServer` is a small thread-per-connection HTTP server (prometheus_client's WSGI app)
on that registry, started and stopped with the worker, with a deadline per connection and a
cap on connections. Labels are bounded: task types are the ones registered on the worker,
outcomes a fixed list, addresses the worker's configured servers.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from functools import partial
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from conveyor.breaker import BreakerState
from conveyor.errors import ConfigError
from conveyor.http_refusal import connection_refusal
from conveyor.metric_children import LabelledChildren

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from conveyor.breaker import CircuitBreaker

# How a handler's run ended, as the worker saw it (the `outcome` label):
# succeeded    it returned a result;
# failed       it raised (or returned something other than bytes or None);
# timed_out    it ran past the task's timeout;
# released     the worker stopped it while shutting down and handed the task back;
# cancelled    the task was cancelled meanwhile (the server said so on a heartbeat);
# lease_lost   the lease ended meanwhile (expired, taken over, or no heartbeat got through).
OUTCOMES: Final = ("succeeded", "failed", "timed_out", "released", "cancelled", "lease_lost")

# What one client may hold on the metrics endpoint: a scraper needs one connection for
# milliseconds; more, or longer, is a client up to no good.
MAX_CONNECTIONS: Final = 32
CONNECTION_DEADLINE: Final = 10.0

# Tasks run from milliseconds to hours (the same buckets as the server's task durations).
_TASK_BUCKETS: Final = (0.005, 0.025, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)


class WorkerMetrics:
    """The worker's metrics. Methods are cheap, thread-safe and never block."""

    def __init__(self) -> None:
        """Create the metrics in a private registry."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.tasks_in_flight = Gauge(
            "conveyor_worker_tasks_in_flight",
            "Attempts holding a slot: leased and not yet finished, including handlers past "
            "their timeout that have not returned.",
            registry=self.registry,
        )
        self.slots = Gauge(
            "conveyor_worker_slots",
            "Most attempts this worker runs at once (its concurrency).",
            registry=self.registry,
        )
        self.sync_handlers_running = Gauge(
            "conveyor_worker_sync_handlers_running",
            "Threads running sync handlers, including ones whose attempt already ended.",
            registry=self.registry,
        )
        self.tasks_leased = Counter(
            "conveyor_worker_tasks_leased_total",
            "Attempts leased by this worker, by task type.",
            ["type"],
            registry=self.registry,
        )
        self.handler_duration = Histogram(
            "conveyor_worker_handler_duration_seconds",
            "How long handlers ran until their outcome was known, by type and outcome "
            "(succeeded, failed, timed_out, released, cancelled, lease_lost).",
            ["type", "outcome"],
            buckets=_TASK_BUCKETS,
            registry=self.registry,
        )
        # Per attempt, through their children: the labels are this worker's task types.
        self._tasks_leased = LabelledChildren(self.tasks_leased)
        self._handler_duration = LabelledChildren(self.handler_duration)
        self.reports_rejected = Counter(
            "conveyor_worker_reports_rejected_total",
            "Outcome reports the server refused because the lease was no longer this "
            "worker's (fencing).",
            registry=self.registry,
        )
        self.reports_failed = Counter(
            "conveyor_worker_reports_failed_total",
            "Outcome reports that could not be delivered: no server answered within the "
            "lease, a server refused the report for another reason, or the worker failed "
            "to settle the attempt (reported failed instead; its log says why).",
            registry=self.registry,
        )
        self.heartbeat_failures = Counter(
            "conveyor_worker_heartbeat_failures_total",
            "Heartbeats that no server answered (or that a server refused).",
            registry=self.registry,
        )
        self.event_loop_lag = Gauge(
            "conveyor_worker_event_loop_lag_seconds",
            "How late the event loop ran the watchdog's latest probe; while the loop is "
            "blocked, how long it has been blocked so far.",
            registry=self.registry,
        )
        self.breaker_open = Gauge(
            "conveyor_worker_server_breaker_open",
            "1 while the circuit breaker of a server address is open or half-open (calls "
            "go to other servers), else 0.",
            ["address"],
            registry=self.registry,
        )

    def prepare(
        self,
        *,
        task_types: Sequence[str],
        concurrency: int,
        breakers: Mapping[str, CircuitBreaker],
    ) -> None:
        """Create every labelled series at zero, so rates work from the first event."""
        self.slots.set(concurrency)
        for task_type in task_types:
            self.tasks_leased.labels(task_type)
            for outcome in OUTCOMES:
                self.handler_duration.labels(task_type, outcome)
        for address, breaker in breakers.items():
            # Read at scrape time: the breaker is thread-safe and always current.
            self.breaker_open.labels(address).set_function(partial(_is_open, breaker))

    def attempt_started(self, task_type: str) -> None:
        """Count one leased attempt, in flight until `attempt_ended`."""
        self.tasks_in_flight.inc()
        self._tasks_leased(task_type).inc()

    def attempt_ended(self) -> None:
        """One attempt counted by `attempt_started` has given its slot back."""
        self.tasks_in_flight.dec()

    def observe_handler(self, task_type: str, outcome: str, seconds: float) -> None:
        """Record how one handler run ended and how long it took."""
        self._handler_duration(task_type, outcome).observe(seconds)


def _is_open(breaker: CircuitBreaker) -> float:
    return float(breaker.state is not BreakerState.CLOSED)


class _QuietHandler(WSGIRequestHandler):
    """One scrape; nothing logged per request (a scrape every 15 s would flood stderr)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Log nothing."""


class _MetricsHTTPServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, as prometheus_client's own server, within limits.

    prometheus_client's `start_http_server` holds a connection, and the thread serving
    it, for as long as the client keeps it open without finishing its request: a client
    could pile up threads and file descriptors in the worker's process until it could
    open no connection to the servers. Here each connection has a deadline for the whole
    exchange, enforced between accepts (`service_actions`), and past a number of open
    connections a new one is answered 503 and closed.
    """

    daemon_threads = True
    # Stopping must not wait for the threads: the deadline ends them soon enough.
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        *,
        max_connections: int,
        deadline: float,
    ) -> None:
        """Bind and listen on `address` (of `family`) at once."""
        self.address_family = family
        self._max_connections = max_connections
        self._deadline = deadline
        self._lock = threading.Lock()
        # Open connections, and when each must be done by (time.monotonic()).
        self._due: dict[socket.socket, float] = {}
        super().__init__(address, _QuietHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a thread of its own, or refuse it past the limit."""
        with self._lock:
            admitted = len(self._due) < self._max_connections
            if admitted:
                self._due[request] = time.monotonic() + self._deadline
        if not admitted:
            with contextlib.suppress(OSError):
                request.sendall(_REFUSAL)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        """The connection is done with: forget it and close it."""
        with self._lock:
            self._due.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Cut off connections past their deadline (their threads then end)."""
        now = time.monotonic()
        with self._lock:
            overdue = [sock for sock, due in self._due.items() if due <= now]
        for sock in overdue:
            _cut_off(sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (cut off, reset): nothing to print to stderr."""

    def cut_off_all(self) -> None:
        """End every connection still open (stopping)."""
        with self._lock:
            connections = list(self._due)
        for sock in connections:
            _cut_off(sock)


def _cut_off(sock: socket.socket) -> None:
    # shutdown, not close: the serving thread still uses the socket, and a read or write
    # blocked in that thread returns at once.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# The answer to a connection past the limit, as the server's HTTP addresses answer theirs.
_REFUSAL: Final = connection_refusal(
    "this worker's metrics endpoint holds as many connections as it may; try again later"
)


class MetricsServer:
    """An HTTP server for one registry's metrics, on one address, until stopped."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        connection_deadline: float = CONNECTION_DEADLINE,
    ) -> None:
        """Nothing listens until `start`.

        At most `max_connections` are served at once; each is closed
        `connection_deadline` seconds after it was accepted, finished or not.
        """
        self._registry = registry
        self._host = host
        self._port = port
        self._max_connections = max_connections
        self._connection_deadline = connection_deadline
        self._server: _MetricsHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Listen; return the bound port (useful with port 0).

        Raises:
            ConfigError: the address cannot be bound (in use, or not this machine's).
        """
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            server = _MetricsHTTPServer(
                (str(sockaddr[0]), self._port),
                family,
                max_connections=self._max_connections,
                deadline=self._connection_deadline,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve worker metrics on {self._host}:{self._port}: {exc}"
            ) from exc
        server.set_app(make_wsgi_app(self._registry))
        # Deadlines are checked between polls: a poll interval well below them.
        poll_interval = min(0.5, self._connection_deadline / 4)
        self._thread = threading.Thread(
            target=server.serve_forever,
            args=(poll_interval,),
            name="conveyor-worker-metrics",
            daemon=True,
        )
        self._server = server
        self._thread.start()
        return int(server.server_port)

    def stop(self) -> None:
        """Stop listening, end open connections, and wait for the server thread."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.cut_off_all()
        server.server_close()
        if thread is not None:
            thread.join(5)
