"""Every Prometheus metric the server exports, in one registry per server instance.

A registry per instance (not the global default) lets several servers live in one process,
as they do in tests. Labels are bounded: RPC methods and outcomes are fixed lists, and task
types go through `type_label`, which names the first MAX_TYPE_LABELS types a server sees
and counts every later one as OTHER_TYPES. Types are the application's own, usually a few
dozen; the bound is against a producer that names a new type per task, which would
otherwise grow every server's memory (and every scrape) for good.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from conveyor.metric_children import LabelledChildren

if TYPE_CHECKING:
    from collections.abc import Iterable

MAX_TYPE_LABELS: Final = 1000
# Not a valid task type name, so it cannot be mistaken for one.
OTHER_TYPES: Final = "(other)"
# The label values of conveyor_task_outcomes_total and conveyor_attempts_cut_short_total.
TASK_OUTCOMES: Final = ("succeeded", "failed", "retried", "released", "cancelled")
CUT_SHORT_REASONS: Final = ("timed_out", "lease_expired")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Long polls wait up to max_lease_wait (30 s), enqueue streams stay while their producer
# enqueues, Work streams for a worker's whole stay: seconds to days.
_LONG_CALL_BUCKETS = (0.1, 1, 5, 15, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600)
# Tasks run from milliseconds to hours.
_TASK_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)


class ServerMetrics:
    """The server's metrics. Methods are cheap and never block."""

    def __init__(self) -> None:
        """Create the metrics in a private registry."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._type_labels: set[str] = set()
        # Request latency only. Streams and long polls last as long as there is nothing to
        # do, not as long as the server takes: here (as they once were) they all landed in
        # +Inf, and the quantiles of each method and of all of them together were theirs.
        self.rpc_duration = Histogram(
            "conveyor_rpc_duration_seconds",
            "Server-side latency of gRPC requests, by method and status code: unary calls "
            "and each request on an enqueue stream (as EnqueueTasks). Streams and long polls "
            "are in conveyor_long_rpc_duration_seconds.",
            ["method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.long_rpc_duration = Histogram(
            "conveyor_long_rpc_duration_seconds",
            "Server-side duration of the calls that stay open while there is nothing to do, "
            "by method and status code: Work and EnqueueStream streams (a worker's or a "
            "producer's stay) and LeaseTasks long polls (their wait).",
            ["method", "code"],
            buckets=_LONG_CALL_BUCKETS,
            registry=self.registry,
        )
        self.tasks_enqueued = Counter(
            "conveyor_tasks_enqueued_total",
            "Tasks created by enqueue calls (an idempotent repeat is not counted).",
            ["type"],
            registry=self.registry,
        )
        # By what became of the task, whoever noticed: a timeout the worker reported and one
        # the reaper found are the same outcome. (The label once named the cause instead for
        # timeouts and lost leases, so a task that timed out on its last attempt was never
        # counted as failed, and a failure-ratio alert missed it.)
        self.task_outcomes = Counter(
            "conveyor_task_outcomes_total",
            "What became of the task after an attempt: succeeded; failed (for good, whatever "
            "ended the attempt); retried (queued again for another attempt); released (queued "
            "again, the attempt not spent, by its worker or by the server for a lease it "
            "could not deliver); cancelled.",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.attempts_cut_short = Counter(
            "conveyor_attempts_cut_short_total",
            "Attempts that ended without their handler's outcome: timed_out (past the task's "
            "timeout, stopped by the worker or found by the reaper), lease_expired (the worker "
            "went silent). What became of their tasks is in conveyor_task_outcomes_total.",
            ["type", "reason"],
            registry=self.registry,
        )
        self.stale_completions = Counter(
            "conveyor_stale_completions_rejected_total",
            "Outcome reports refused because their lease was no longer current (fencing).",
            registry=self.registry,
        )
        self.auth_refusals = Counter(
            "conveyor_auth_refusals_total",
            "Calls refused by authentication (unauthenticated) or by role (permission_denied).",
            ["reason"],
            registry=self.registry,
        )
        self.tokens_file_stale = Gauge(
            "conveyor_tokens_file_stale",
            "1 while the tokens file has changed but cannot be read or parsed: the previous "
            "tokens stay in force, so a token revoked in the file is still accepted.",
            registry=self.registry,
        )
        self.limit_refusals = Counter(
            "conveyor_limit_refusals_total",
            "Requests refused by a configured limit: request_rate (per token), enqueue_streams "
            "(streams open per token), payload_size "
            "(a payload or result), batch_size (tasks per enqueue, reports per call).",
            ["limit"],
            registry=self.registry,
        )
        self.tasks_by_state = Gauge(
            "conveyor_tasks",
            "Live tasks (queued, running) by state and type, sampled from the database.",
            ["state", "type"],
            registry=self.registry,
        )
        self.oldest_queued = Gauge(
            "conveyor_oldest_queued_task_age_seconds",
            "How long the oldest available queued task of each type has waited (sampled).",
            ["type"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "conveyor_task_queue_wait_seconds",
            "Time from a task becoming available (enqueue, end of backoff, a worker's "
            "release) to its start, a lease sent to a worker; once per start.",
            ["type"],
            buckets=_TASK_BUCKETS,
            registry=self.registry,
        )
        self.task_duration = Histogram(
            "conveyor_task_duration_seconds",
            "Time from an attempt's start to its reported outcome, by type and outcome.",
            ["type", "outcome"],
            buckets=_TASK_BUCKETS,
            registry=self.registry,
        )
        self.last_sample = Gauge(
            "conveyor_stats_sampled_timestamp_seconds",
            "When the database-derived gauges were last sampled (Unix time).",
            registry=self.registry,
        )
        self.workers_by_state = Gauge(
            "conveyor_workers",
            "Registered workers by state, sampled from the database.",
            ["state"],
            registry=self.registry,
        )
        self.is_leader = Gauge(
            "conveyor_leader",
            "1 while this server holds the maintenance role, else 0.",
            registry=self.registry,
        )
        self.leader_term = Gauge(
            "conveyor_leader_term",
            "The term under which this server last led (0 if never).",
            registry=self.registry,
        )
        self.type_paused = Gauge(
            "conveyor_task_type_paused",
            "1 for each task type an operator paused (not leased until resumed), sampled.",
            ["type"],
            registry=self.registry,
        )
        self.operator_actions = Counter(
            "conveyor_operator_actions_total",
            "Operator actions applied through this server: tasks retried or cancelled in "
            "bulk or by id, types paused or resumed.",
            ["action"],
            registry=self.registry,
        )
        self.enqueue_group_size = Histogram(
            "conveyor_enqueue_group_calls",
            "EnqueueTasks calls that shared one insert statement and commit (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.report_group_size = Histogram(
            "conveyor_report_group_calls",
            "Success reports applied together by one statement and commit (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.lease_claims = Counter(
            "conveyor_lease_claims_total",
            "Claims made for LeaseTasks long polls and Work streams, by result: tasks (leased "
            "some), empty (found none), held (found ready tasks locked by another claim; it "
            "claims again in milliseconds), skipped (woken for types another claim had just "
            "found empty), handed_over (no claim: an enqueue leased its tasks to the waiting "
            "poll).",
            ["result"],
            registry=self.registry,
        )
        self.work_streams = Gauge(
            "conveyor_work_streams",
            "Work streams open on this server: workers leasing and reporting through it.",
            registry=self.registry,
        )
        self.enqueue_streams = Gauge(
            "conveyor_enqueue_streams",
            "EnqueueStream calls open on this server: clients enqueueing through it. Their "
            "requests count in conveyor_rpc_duration_seconds as EnqueueTasks calls.",
            registry=self.registry,
        )
        self.work_stream_messages = Counter(
            "conveyor_work_stream_messages_total",
            "Messages on Work streams, by kind: grant (room for leases, alone), reports (a "
            "batch of outcomes, with any grant), leases (sent to a worker), answer (to a "
            "batch of outcomes).",
            ["kind"],
            registry=self.registry,
        )
        self.tasks_pruned = Counter(
            "conveyor_tasks_pruned_total",
            "Finished tasks deleted with their history by the retention policy, by state.",
            ["state"],
            registry=self.registry,
        )
        self.tasks_prune_behind = Gauge(
            "conveyor_tasks_prune_behind_seconds",
            "How long the retention has been behind: seconds since its first round, of those "
            "in a row, that ended with old finished tasks left over or more to read (0: the "
            "last round deleted every one it found). Leader only.",
            registry=self.registry,
        )
        self.workers_pruned = Counter(
            "conveyor_workers_pruned_total",
            "Stopped and lost workers deleted by the leader once silent longer than the "
            "worker retention, by state.",
            ["state"],
            registry=self.registry,
        )
        self.task_table_analyzed = Counter(
            "conveyor_task_table_analyzed_total",
            "ANALYZEs of conveyor_tasks run by the leader because its planner statistics fell "
            "behind its contents.",
            registry=self.registry,
        )
        # Apart from the ANALYZEs that ran, so a dashboard of those stays true: a skipped
        # one gathered nothing.
        self.task_table_analyze_skipped = Counter(
            "conveyor_task_table_analyze_skipped_total",
            "ANALYZEs of conveyor_tasks the leader attempted that PostgreSQL skipped, by "
            "reason: locked (another session held the table) or refused (any other warning).",
            ["reason"],
            registry=self.registry,
        )
        self.db_pool_in_use = Gauge(
            "conveyor_db_pool_connections_in_use",
            "Database connections checked out of this server's pool.",
            registry=self.registry,
        )
        self.http_connections_dropped = Counter(
            "conveyor_http_connections_dropped_total",
            "HTTP connections closed or refused by a limit, by reason: request_head_timeout "
            "(no complete request in time), answer_timeout (not answered in time, or the "
            "client did not read the answer), evicted (closed while idle to make room for a "
            "new one) or refused (503: every connection was busy with a request).",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("request_head_timeout", "answer_timeout", "evicted", "refused"):
            self.http_connections_dropped.labels(reason)
        # The per-task and per-call series, through their children (LabelledChildren).
        self._rpc_duration = LabelledChildren(self.rpc_duration)
        self._long_rpc_duration = LabelledChildren(self.long_rpc_duration)
        self._queue_wait = LabelledChildren(self.queue_wait)
        self._task_outcomes = LabelledChildren(self.task_outcomes)
        self._task_duration = LabelledChildren(self.task_duration)
        self._tasks_enqueued = LabelledChildren(self.tasks_enqueued)
        self._lease_claims = LabelledChildren(self.lease_claims)

    def type_label(self, task_type: str) -> str:
        """The label value for a task type: itself, or OTHER_TYPES past MAX_TYPE_LABELS."""
        if task_type in self._type_labels:
            return task_type
        if len(self._type_labels) < MAX_TYPE_LABELS:
            self._type_labels.add(task_type)
            self._start_at_zero(task_type)
            return task_type
        return OTHER_TYPES

    def know_types(self, task_types: Iterable[str]) -> None:
        """Start the counters of `task_types` (a registering worker's) at zero now."""
        for task_type in task_types:
            self.type_label(task_type)

    def _start_at_zero(self, label: str) -> None:
        """A type's counters, at zero from the moment this server first meets the type.

        A series that first appears at 1 has no rise for rate() or increase() to see: the
        failure-ratio alert (operations.md) missed each type's first failure on each server.
        A type is met at its first enqueue here or when a worker for it registers here,
        usually long before its first outcome.
        """
        self._tasks_enqueued(label)
        for outcome in TASK_OUTCOMES:
            self._task_outcomes(label, outcome)
        for reason in CUT_SHORT_REASONS:
            self.attempts_cut_short.labels(label, reason)

    def count_enqueued(self, task_type: str, count: int) -> None:
        """Count `count` tasks of `task_type` created by one enqueue."""
        self._tasks_enqueued(self.type_label(task_type)).inc(count)

    def count_claim(self, kind: str) -> None:
        """Count one lease claim by what it found (see `lease_claims`)."""
        self._lease_claims(kind).inc()

    def observe_queue_wait(self, task_type: str, seconds: float) -> None:
        """How long one leased task waited in the queue."""
        self._queue_wait(self.type_label(task_type)).observe(max(seconds, 0.0))

    def observe_outcome(self, task_type: str, outcome: str, ran_for: float | None) -> None:
        """Count one attempt's outcome and, when it ran (`ran_for`), how long it took."""
        label = self.type_label(task_type)
        self._task_outcomes(label, outcome).inc()
        if ran_for is not None:
            self._task_duration(label, outcome).observe(max(ran_for, 0.0))

    def count_cut_short(self, task_type: str, reason: str) -> None:
        """Count an attempt that ended without its handler's outcome (`reason`)."""
        self.attempts_cut_short.labels(self.type_label(task_type), reason).inc()

    def observe_rpc(self, method: str, code: str, seconds: float, *, long_lived: bool) -> None:
        """Record one finished RPC: a request, or (`long_lived`) a stream or a long poll."""
        children = self._long_rpc_duration if long_lived else self._rpc_duration
        children(method, code).observe(seconds)

    def set_leadership(self, proof: object | None) -> None:
        """Track leadership changes (`proof` has a `term` while leading, None otherwise)."""
        self.is_leader.set(0 if proof is None else 1)
        term = getattr(proof, "term", None)
        if term is not None:
            self.leader_term.set(term)

    def count_http_connection_dropped(self, reason: str) -> None:
        """Count an HTTP connection a limit closed or refused (see monitoring/http.py)."""
        self.http_connections_dropped.labels(reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric; safe to call from any thread."""
        return generate_latest(self.registry)
