"""TaskService: the producers' API (enqueue, get, cancel), validated and applied in SQL."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid
from collections import Counter
from dataclasses import replace
from itertools import compress
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.protobuf.duration_pb2 import Duration

from conveyor.codec import size_limit
from conveyor.errors import InvalidTask, TaskAlreadyFinished, TaskNotFound
from conveyor.group_commit import GroupCommit, rows_and_bytes
from conveyor.protocol import ENQUEUE_STREAM_ACCEPTED, convert
from conveyor.protocol.limits import MAX_TRACE_ENTRIES, MAX_TRACE_KEY, MAX_TRACE_VALUE
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server import failpoints
from conveyor.server.enqueue_stream import EnqueueStream
from conveyor.server.rpc import outliving_the_call, rpc_method, server_stopping, stream_method
from conveyor.server.security import OPEN_GATE, Gate, caller
from conveyor.storage import queries
from conveyor.types import (
    MAX_RETRIES_LIMIT,
    TaskEvent,
    TaskState,
    TaskStatus,
    known_task_type,
    normalize_task_id,
    validate_max_retries,
    validate_task_type,
    validate_timeout,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence
    from datetime import timedelta

    from conveyor.auth import Principal
    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.config import ServerConfig
    from conveyor.server.database import Database
    from conveyor.server.explanation import Explainer
    from conveyor.server.handoff import HandoffDesk, Offer
    from conveyor.server.notifier import TaskNotifier

log = logging.getLogger("conveyor.server.tasks")

# Task ids already in the canonical form `normalize_task_id` returns (lower-case hex with
# dashes), joined by commas: true of every batch the Python clients send, so the server
# need not parse and re-format each id. One match over the joined batch costs a third of a
# match per id. A comma cannot occur inside a match, so with the length also checked (37
# characters per id, less one) each id is exactly one canonical UUID.
_CANONICAL_UUID: Final = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_CANONICAL_IDS: Final = re.compile(f"(?:{_CANONICAL_UUID},)*{_CANONICAL_UUID}").fullmatch
_CANONICAL_LENGTH: Final = 37
# Bound on the caches of validated task types and timeouts (cleared when full): a few
# distinct values are the norm, and a client sending endless new ones must not grow them.
_CACHE_LIMIT: Final = 1024


# What GetTask sends of a task's history: its first event and the latest ones, this many at
# most, within about this many bytes. A history has no end of its own (a task handed back
# over and over), and the reply must fit in a message beside a payload and a result.
def enqueue_weight(batch: queries.NewTasks) -> int:
    """A batch's share of a joined insert: its rows and its payloads' bytes (group_commit)."""
    return rows_and_bytes(len(batch), sum(map(len, batch.payloads)))


HISTORY_EVENTS: Final = 1000
HISTORY_BYTES: Final = 512 * 1024


def status_from_row(row: Any, events: list[Any] | None = None) -> TaskStatus:
    """A TaskStatus from a `task_get` row and optional `task_event_list` rows."""
    shown = len(events) if events else 0
    return TaskStatus(
        id=str(row["id"]),
        type=row["type"],
        state=TaskState(row["state"]),
        attempts=row["attempt"],
        max_retries=row["max_retries"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        last_error=row["last_error"],
        worker_id=row["worker_id"],
        result=row["result"],
        timeout=row["timeout"],
        available_at=row["available_at"],
        progress=row["progress"],
        progress_at=row["progress_at"],
        history=tuple(
            TaskEvent(
                at=event["at"],
                event=event["event"],
                state=TaskState(event["state"]),
                attempt=event["attempt"],
                worker_id=event["worker_id"],
                detail=event["detail"],
                actor=event["actor"],
            )
            for event in events or ()
        ),
        history_omitted=max(events[0]["total"] - shown, 0) if events else 0,
    )


def _trace_context(entries: Mapping[str, str]) -> str | None:
    """The producer's W3C trace context as JSON, bounded: it rides along with every lease."""
    if not entries:
        return None
    if len(entries) > MAX_TRACE_ENTRIES:
        raise InvalidTask(
            f"trace_context has {len(entries)} entries; the limit is {MAX_TRACE_ENTRIES}",
            field="trace_context",
        )
    for key, value in entries.items():
        if "\x00" in key or "\x00" in value:
            raise InvalidTask(
                "trace_context must not contain NUL characters", field="trace_context"
            )
        if len(key) > MAX_TRACE_KEY or len(value) > MAX_TRACE_VALUE:
            raise InvalidTask(
                f"trace_context entry {key[:MAX_TRACE_KEY]!r} is too long (keys up to "
                f"{MAX_TRACE_KEY} characters, values up to {MAX_TRACE_VALUE})",
                field="trace_context",
            )
    return json.dumps(dict(entries), sort_keys=True)


class TaskService(pb_grpc.TaskServiceServicer):
    """Enqueue, inspect and cancel tasks."""

    # Who may call (see rpc.rpc_method); open until the server installs its own gate.
    gate: Gate = OPEN_GATE

    def __init__(
        self,
        config: ServerConfig,
        database: Database,
        notifier: TaskNotifier,
        metrics: ServerMetrics,
        *,
        explainer: Explainer,
        handoff: HandoffDesk | None = None,
    ) -> None:
        """Wire the service to its collaborators (`handoff`: the waiting polls' offers)."""
        self.config = config
        self.database = database
        self.notifier = notifier
        self.metrics = metrics
        self.explainer = explainer
        self.handoff = handoff
        self.group_commit: GroupCommit[queries.NewTasks, bool] = GroupCommit(
            database.bind(self._insert_and_wake),
            combine=queries.NewTasks.concat,
            count=len,
            weigh=enqueue_weight,
            stopped=server_stopping,
            observe_group=metrics.enqueue_group_size.observe,
        )
        # The EnqueueStream calls open here (see enqueue_stream.py), so draining can end them.
        self.streams: set[EnqueueStream] = set()
        # Open enqueue streams by token id, for max_enqueue_streams_per_token.
        self._streams_by_token: Counter[str] = Counter()
        self.draining = False
        # Timeouts that passed validation before (types: conveyor.types.known_task_type): a
        # batch usually repeats one type and one timeout a thousand times, each checked once.
        self._valid_timeouts: dict[tuple[int, int], timedelta] = {}

    async def _insert_and_wake(self, conn: Any, batch: queries.NewTasks) -> list[bool]:
        """Insert `batch`; wake this process's long polls as soon as it is committed.

        The insert is one statement on a connection outside any transaction, so it has
        committed when it returns (inside a transaction the wake-up would come too early).
        A small batch first looks for long polls waiting for its types: the statement then
        leases those tasks to them directly (see handoff.py).
        """
        offers = (
            self.handoff.reserve(batch.types)
            if self.handoff is not None and len(batch) < queries.NEW_IDS_FIRST_FROM
            else None
        )
        if offers is not None and any(offer is not None for offer in offers):
            return await self._insert_and_hand_over(conn, batch, offers)
        created = await queries.task_insert_many(conn, batch)
        if any(created):
            # Before the connection goes back to the pool and the callers resume: every
            # step between the commit and the claim is part of a new task's start latency.
            # Other servers hear the NOTIFY the insert sent.
            self.notifier.wake()
            self._count_created(batch, created)
        return created

    def _count_created(self, batch: queries.NewTasks, created: Sequence[bool]) -> None:
        """Count the tasks a committed insert created, by type.

        Here, where the write completes, not in the call that asked for it: a call
        cancelled (deadline, client gone) while its tasks sat in a shared write never
        resumes, yet the write commits, and the client's retry is an idempotent repeat,
        not counted. Counted by the caller, those tasks were counted nowhere.
        """
        for task_type, count in Counter(compress(batch.types, created)).items():
            self.metrics.count_enqueued(task_type, count)

    async def _insert_and_hand_over(
        self, conn: Any, batch: queries.NewTasks, offers: list[Offer | None]
    ) -> list[bool]:
        """Insert `batch`, leasing what it can to the polls whose `offers` were reserved."""
        desk = self.handoff
        assert desk is not None  # noqa: S101 - only called with offers from it
        lease_ids = [str(uuid.uuid4()) if offer is not None else None for offer in offers]

        async def insert_and_settle() -> list[bool]:
            try:
                rows = await queries.task_insert_leasing(
                    conn,
                    batch,
                    offered_to=[offer.worker_id if offer else None for offer in offers],
                    lease_ids=lease_ids,
                    # One for the statement: the longest of the offered workers' (a lease
                    # a little long for another costs only a slower recovery if it dies).
                    lease_ttl=max(offer.lease_ttl for offer in offers if offer is not None),
                    deadline_grace=self.config.deadline_grace,
                )
            except BaseException:
                desk.settle_unknown(offers, batch.ids, lease_ids)
                raise
            return self._settle(desk, offers, batch, rows)

        # A statement that may commit leases must end in their delivery or their hand-back
        # even if this call is cancelled (as the claim is, worker_service.py), and cancelled
        # again while it waits: awaited a second time, the statement was cancelled through
        # that await, and neither settled it (its polls waited without end, and a stopping
        # server for the desk's whole timeout).
        return await outliving_the_call(insert_and_settle())

    def _settle(
        self, desk: HandoffDesk, offers: list[Offer | None], batch: queries.NewTasks, rows: Any
    ) -> list[bool]:
        """Deliver the leases, wake the polls for what stayed queued; what was created."""
        delivered = self._first_occurrences(batch, rows)
        # Polls get their leases before this connection goes back to the pool and the
        # callers resume, as with the wake-up.
        desk.settle(offers, delivered)
        if any(row is not None and row["created"] and not row["leased"] for row in delivered):
            self.notifier.wake()
        created = [row is not None and bool(row["created"]) for row in delivered]
        self._count_created(batch, created)
        return created

    @staticmethod
    def _first_occurrences(batch: queries.NewTasks, rows: Sequence[Any]) -> list[Any]:
        """`rows`, with None at every repeat of an id: only its first position was created."""
        seen: set[str] = set()
        first: list[Any] = []
        for task_id, row in zip(batch.ids, rows, strict=True):
            first.append(row if task_id not in seen else None)
            seen.add(task_id)
        return first

    def _parse_batch(self, specs: Sequence[pb.TaskSpec]) -> queries.NewTasks:
        """The tasks of a non-empty request, validated, in order.

        InvalidTask names the first bad task. The common batch (canonical ids, every type
        and timeout valid) is checked column by column, each distinct type, timeout and
        trace context once; any other batch, including every invalid one, is checked task
        by task by `_validated`, which raises the exact error of the first bad task.
        """
        return self._parse_columns(specs) or queries.NewTasks.of(
            [self._validated(spec, index) for index, spec in enumerate(specs)]
        )

    def _parse_columns(self, specs: Sequence[pb.TaskSpec]) -> queries.NewTasks | None:
        """The fast path of `_parse_batch`: the tasks, or None if any needs a closer look."""
        # One pass over the messages. The tuples hold only strings, bytes and ints, which
        # the garbage collector stops tracking at its first look; a Duration message kept
        # per task would be tracked (with its TaskSpec) for as long as the batch lives.
        rows = [
            (
                spec.id,
                spec.type,
                spec.payload,
                spec.timeout.seconds,
                spec.timeout.nanos,
                spec.max_retries,
            )
            for spec in specs
        ]
        ids, types, payloads, seconds, nanos, max_retries = zip(*rows, strict=True)
        del rows
        joined_ids = ",".join(ids)
        if not (
            len(joined_ids) == _CANONICAL_LENGTH * len(ids) - 1
            and _CANONICAL_IDS(joined_ids)
            and self._known_types(set(types))
            and max(map(len, payloads)) <= self.config.max_payload_bytes
            and max(max_retries) <= MAX_RETRIES_LIMIT
        ):
            return None
        # An unset timeout reads as zero, which is invalid: the slow path then says which.
        keys = set(zip(seconds, nanos, strict=True))
        timeouts: dict[tuple[int, int], timedelta] = {}
        for key in keys:
            timeout = self._valid_timeouts.get(key) or self._learn_timeout(key)
            if timeout is None:
                return None
            timeouts[key] = timeout
        if len(timeouts) == 1:
            each_timeout = [timeouts.popitem()[1]] * len(ids)
        else:
            each_timeout = [timeouts[key] for key in zip(seconds, nanos, strict=True)]
        traces = self._trace_contexts(specs)
        if traces is None:
            return None
        return queries.NewTasks(ids, types, payloads, each_timeout, max_retries, traces)

    def _known_types(self, types: set[str]) -> bool:
        """Whether every type is valid (remembering the new ones); False on a bad one."""
        try:
            for task_type in types:
                known_task_type(task_type)
        except InvalidTask:
            return False
        return True

    def _learn_timeout(self, key: tuple[int, int]) -> timedelta | None:
        """A (seconds, nanos) timeout not seen before, validated and remembered; None if bad."""
        try:
            timeout = validate_timeout(
                convert.from_duration(Duration(seconds=key[0], nanos=key[1]), field="timeout")
            )
        except InvalidTask:
            return None
        if len(self._valid_timeouts) >= _CACHE_LIMIT:
            self._valid_timeouts.clear()
        self._valid_timeouts[key] = timeout
        return timeout

    @staticmethod
    def _trace_contexts(specs: Sequence[pb.TaskSpec]) -> list[str | None] | None:
        """Each task's trace context as JSON text (or None); None if one is invalid.

        A traced producer sends the same context with every task of a call: each distinct
        one is checked and encoded once.
        """
        # A generator: each map is let go at once (a list of a thousand maps keeps their
        # messages alive, and freeing them all at the end costs as much as reading them).
        if not any(spec.trace_context for spec in specs):
            return [None] * len(specs)
        encoded: dict[tuple[tuple[str, str], ...], str | None] = {}
        traces: list[str | None] = []
        for spec in specs:
            context = spec.trace_context
            key = tuple(sorted(context.items()))
            if key not in encoded:
                try:
                    encoded[key] = _trace_context(context)
                except InvalidTask:
                    return None
            traces.append(encoded[key])
        return traces

    def _validated(self, spec: pb.TaskSpec, index: int) -> queries.NewTask:
        """The task at `index` of a request, validated; errors name the index."""
        try:
            return self._parse_spec(spec)
        except InvalidTask as exc:
            raise InvalidTask(f"tasks[{index}]: {exc.message}", field=exc.field) from None

    def _parse_spec(self, spec: pb.TaskSpec) -> queries.NewTask:
        if not spec.id:
            raise InvalidTask("task id is required (clients generate a UUIDv7)", field="id")
        if not spec.HasField("timeout"):
            raise InvalidTask("timeout is required", field="timeout")
        if len(spec.payload) > size_limit(spec.payload, self.config.max_payload_bytes):
            self.metrics.limit_refusals.labels("payload_size").inc()
            raise InvalidTask(
                f"payload is {len(spec.payload)} bytes; the limit is "
                f"{self.config.max_payload_bytes}",
                field="payload",
            )
        return queries.NewTask(
            id=normalize_task_id(spec.id),
            type=validate_task_type(spec.type),
            payload=spec.payload,
            timeout=validate_timeout(convert.from_duration(spec.timeout, field="timeout")),
            max_retries=validate_max_retries(spec.max_retries),
            trace_context=_trace_context(spec.trace_context),
        )

    @rpc_method("EnqueueTasks")
    async def EnqueueTasks(  # noqa: N802 - gRPC method name
        self, request: pb.EnqueueTasksRequest, context: Any
    ) -> pb.EnqueueTasksResponse:
        """Insert a batch of tasks in one statement; idempotent per id."""
        return await self.enqueue(request)

    # The generated base class declares the stream as a request iterator in, responses out;
    # this one reads and writes through the context instead (see rpc.stream_method).
    @stream_method("EnqueueStream")
    async def EnqueueStream(self, context: Any) -> None:  # type: ignore[override]  # noqa: N802
        """Apply EnqueueTasks requests as they come, answering each (see enqueue_stream.py)."""
        if not self.config.enqueue_stream:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "this server has enqueue streams turned off; use EnqueueTasks",
            )
        if self.draining:
            raise server_stopping()
        async with self._stream_slot_of(caller(), context):
            # Accepted: clients write nothing before this (client/enqueue_stream.py says why).
            await context.send_initial_metadata(((ENQUEUE_STREAM_ACCEPTED, "1"),))
            stream = EnqueueStream(self, context, self.config.enqueue_stream_idle.total_seconds())
            self.streams.add(stream)
            if self.draining:  # began while the metadata went out: stop it like the others
                stream.stop()
            self.metrics.enqueue_streams.inc()
            try:
                await stream.serve()
            finally:
                self.streams.discard(stream)
                self.metrics.enqueue_streams.dec()

    @contextlib.asynccontextmanager
    async def _stream_slot_of(self, principal: Principal, context: Any) -> AsyncIterator[None]:
        """Hold one of the token's enqueue stream slots while the stream is open, or refuse it.

        Requests on a stream are metered one by one, but the stream itself holds one of the
        server's `max_concurrent_rpcs` slots for as long as it is open, which a producer
        could fill by opening streams and so lock out every worker. Only tokens are capped:
        with authentication off every caller is the same anonymous admin, and one cap would
        be shared by every application.

        The refusal is UNIMPLEMENTED, as from a server with streams off, not
        RESOURCE_EXHAUSTED: every client that knows the stream, older releases included,
        then enqueues with calls for a while (EnqueueRoute), so a legitimate fleet past the
        cap still works, a call each, where a RESOURCE_EXHAUSTED that is no rate limit would
        fail an older client's enqueue outright.
        """
        limit = self.config.max_enqueue_streams_per_token
        if not self.gate.authenticating or limit is None:
            yield
            return
        token_id = principal.token_id
        if self._streams_by_token[token_id] >= limit:
            self.metrics.limit_refusals.labels("enqueue_streams").inc()
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"enqueue stream limit: token {token_id} has {limit} enqueue streams open on "
                "this server; use EnqueueTasks",
            )
        self._streams_by_token[token_id] += 1
        try:
            yield
        finally:
            self._streams_by_token[token_id] -= 1
            if not self._streams_by_token[token_id]:
                del self._streams_by_token[token_id]

    def start_draining(self) -> None:
        """End the enqueue streams once they have answered what they read."""
        self.draining = True
        for stream in self.streams:
            stream.stop()

    async def enqueue(self, request: pb.EnqueueTasksRequest) -> pb.EnqueueTasksResponse:
        """An EnqueueTasks request's work, whether it came as a call or on a stream."""
        if not request.tasks:
            raise InvalidTask("no tasks to enqueue")
        if len(request.tasks) > self.config.max_batch:
            self.metrics.limit_refusals.labels("batch_size").inc()
            raise InvalidTask(
                f"{len(request.tasks)} tasks in one call; the limit is {self.config.max_batch}"
            )
        batch = self._parse_batch(request.tasks)
        # Either way the insert counts what it created (`_count_created`), even for a
        # call cancelled meanwhile: the group commit's write outlives its callers.
        if self.config.group_commit:
            created = await self.group_commit.submit(batch)
        else:
            created = await outliving_the_call(self.database.bind(self._insert_and_wake)(batch))
        failpoints.trigger(self.config.failpoints, "enqueue.after_commit")
        return pb.EnqueueTasksResponse(task_ids=batch.ids, created=created)

    @rpc_method("GetTask")
    async def GetTask(  # noqa: N802 - gRPC method name
        self, request: pb.GetTaskRequest, context: Any
    ) -> pb.GetTaskResponse:
        """One task, with its history, payload and explanation if asked."""
        task_id = normalize_task_id(request.task_id)
        # One snapshot for the row, its history, its payload and its explanation: separate
        # statements let a report commit in between, and a status said RUNNING with a
        # history that ended in `succeeded` (as the dashboard's task page reads them), or
        # `tasks show` said RUNNING above "succeeded after 1 attempt(s)" (9 pairs in 5,946
        # of a review's, when it made two calls). A lone read needs none.
        several_reads = (
            request.include_history or request.include_payload or request.include_explanation
        )
        reading = self.database.snapshot() if several_reads else self.database.connection()
        async with reading as conn:
            row = await queries.task_get(conn, task_id=task_id)
            if row is None:
                raise TaskNotFound(task_id=task_id)
            events = (
                await queries.task_event_list(
                    conn, task_id=task_id, limit=HISTORY_EVENTS, max_bytes=HISTORY_BYTES
                )
                if request.include_history
                else None
            )
            payload = (
                await queries.task_payload_get(conn, task_id=task_id)
                if request.include_payload
                else None
            )
            explained = (
                await self.explainer.read(conn, task_id) if request.include_explanation else None
            )
        status = replace(
            status_from_row(row, events),
            payload=payload,
            explanation=tuple(explained[1]) if explained is not None else (),
        )
        return pb.GetTaskResponse(task=convert.status_to_info(status))

    async def _cancel_and_count(self, task_id: str) -> Any:
        """Cancel `task_id` unless it is final, count the cancel; the task's row after."""
        async with self.database.transaction() as conn:
            locked = await queries.task_lock_for_cancel(conn, task_id=task_id)
            if locked is None:
                raise TaskNotFound(task_id=task_id)
            state = TaskState(locked["state"])
            if state in (TaskState.SUCCEEDED, TaskState.FAILED):
                raise TaskAlreadyFinished(task_id=task_id, state=state.value)
            if state is not TaskState.CANCELLED:
                detail = (
                    f"cancelled while running attempt {locked['attempt']} on "
                    f"{locked['worker_id']}; its lease is revoked"
                    if state is TaskState.RUNNING
                    else "cancelled while queued"
                )
                await queries.task_cancel(
                    conn, task_id=task_id, detail=detail, actor=caller().actor
                )
            row = await queries.task_get(conn, task_id=task_id)
        if row is None:  # impossible inside the transaction that locked it; keeps mypy honest
            raise TaskNotFound(task_id=task_id)
        if state is not TaskState.CANCELLED:
            self.metrics.task_outcomes.labels(
                self.metrics.type_label(row["type"]), "cancelled"
            ).inc()
        return row

    @rpc_method("CancelTask")
    async def CancelTask(  # noqa: N802 - gRPC method name
        self, request: pb.CancelTaskRequest, context: Any
    ) -> pb.CancelTaskResponse:
        """Cancel a queued or running task. Cancelling a cancelled task is a no-op."""
        task_id = normalize_task_id(request.task_id)
        # Run to its end even if the call is cancelled meanwhile (deadline, client gone):
        # cut off while its COMMIT was in flight, the cancel could land uncounted in
        # conveyor_task_outcomes_total, and the client's retry then finds it cancelled
        # already, a no-op that counts nothing. Enqueues and reports outlive their calls
        # for the same reason.
        row = await outliving_the_call(self._cancel_and_count(task_id))
        return pb.CancelTaskResponse(task=convert.status_to_info(status_from_row(row)))
