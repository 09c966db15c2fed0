"""Every Prometheus metric a worker exports, and the HTTP endpoint that serves them.

Each Worker has its own registry (not the global default), so several workers can live in
one process, as they do in tests, and an application can serve a worker's registry itself.
`MetricsServer` is prometheus_client's own small HTTP server on that registry, started and
stopped with the worker. Labels are bounded: task types are the ones registered on the
worker, outcomes a fixed list, addresses the worker's configured servers.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from conveyor.breaker import BreakerState
from conveyor.errors import ConfigError
from conveyor.metric_children import LabelledChildren

if TYPE_CHECKING:
    import threading
    from collections.abc import Mapping, Sequence
    from wsgiref.simple_server import WSGIServer

    from conveyor.breaker import CircuitBreaker

# How a handler's run ended, as the worker saw it (the `outcome` label):
# succeeded    it returned a result;
# failed       it raised (or returned something other than bytes or None);
# timed_out    it ran past the task's timeout;
# released     the worker stopped it while shutting down and handed the task back;
# cancelled    the task was cancelled meanwhile (the server said so on a heartbeat);
# lease_lost   the lease ended meanwhile (expired, taken over, or no heartbeat got through).
OUTCOMES: Final = ("succeeded", "failed", "timed_out", "released", "cancelled", "lease_lost")

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
            "lease, or a server refused the report for another reason.",
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


class MetricsServer:
    """prometheus_client's HTTP server for one registry, on one address, until stopped."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        """Nothing listens until `start`."""
        self._registry = registry
        self._host = host
        self._port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Listen; return the bound port (useful with port 0).

        Raises:
            ConfigError: the address cannot be bound (in use, or not this machine's).
        """
        try:
            self._server, self._thread = start_http_server(
                self._port, addr=self._host, registry=self._registry
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve worker metrics on {self._host}:{self._port}: {exc}"
            ) from exc
        return int(self._server.server_port)

    def stop(self) -> None:
        """Stop listening and wait for the server thread (it ends within one poll interval)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(5)
