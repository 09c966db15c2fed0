"""TaskService: the producers' API (enqueue, get, cancel), validated and applied in SQL."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import InvalidTask, TaskAlreadyFinished, TaskNotFound
from conveyor.protocol import convert
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server import failpoints
from conveyor.server.group_commit import GroupCommit
from conveyor.server.rpc import rpc_method
from conveyor.storage import queries
from conveyor.types import (
    TaskEvent,
    TaskState,
    TaskStatus,
    normalize_task_id,
    validate_max_retries,
    validate_task_type,
    validate_timeout,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.config import ServerConfig
    from conveyor.server.database import Database
    from conveyor.server.notifier import TaskNotifier

log = logging.getLogger("conveyor.server.tasks")

# W3C trace context needs two entries (traceparent, tracestate); room for a few more.
MAX_TRACE_ENTRIES: Final = 8
MAX_TRACE_KEY: Final = 64
MAX_TRACE_VALUE: Final = 512


def status_from_row(row: Any, events: list[Any] | None = None) -> TaskStatus:
    """A TaskStatus from a `task_get` row and optional `task_event_list` rows."""
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
            )
            for event in events or ()
        ),
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

    def __init__(
        self,
        config: ServerConfig,
        database: Database,
        notifier: TaskNotifier,
        metrics: ServerMetrics,
    ) -> None:
        """Wire the service to its collaborators."""
        self.config = config
        self.database = database
        self.notifier = notifier
        self.metrics = metrics
        self.group_commit: GroupCommit[queries.NewTask] = GroupCommit(
            database, queries.task_insert_many, metrics.enqueue_group_size.observe
        )

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
        if len(spec.payload) > self.config.max_payload_bytes:
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
        if not request.tasks:
            raise InvalidTask("no tasks to enqueue")
        if len(request.tasks) > self.config.max_batch:
            raise InvalidTask(
                f"{len(request.tasks)} tasks in one call; the limit is {self.config.max_batch}"
            )
        tasks = [self._validated(spec, i) for i, spec in enumerate(request.tasks)]
        if self.config.group_commit:
            rows = await self.group_commit.submit(tasks)
        else:
            async with self.database.connection() as conn:
                rows = await queries.task_insert_many(conn, tasks)
        failpoints.trigger(self.config.failpoints, "enqueue.after_commit")
        created = [bool(row["created"]) for row in rows]
        for task, was_created in zip(tasks, created, strict=True):
            if was_created:
                self.metrics.tasks_enqueued.labels(task.type).inc()
        if any(created):
            # Long polls in this process need not wait for the NOTIFY round trip.
            self.notifier.wake()
        return pb.EnqueueTasksResponse(task_ids=[str(row["id"]) for row in rows], created=created)

    @rpc_method("GetTask")
    async def GetTask(  # noqa: N802 - gRPC method name
        self, request: pb.GetTaskRequest, context: Any
    ) -> pb.GetTaskResponse:
        """One task, with its history if asked."""
        task_id = normalize_task_id(request.task_id)
        async with self.database.connection() as conn:
            row = await queries.task_get(conn, task_id=task_id)
            if row is None:
                raise TaskNotFound(task_id=task_id)
            events = (
                await queries.task_event_list(conn, task_id=task_id)
                if request.include_history
                else None
            )
            payload = (
                await queries.task_payload_get(conn, task_id=task_id)
                if request.include_payload
                else None
            )
        status = replace(status_from_row(row, events), payload=payload)
        return pb.GetTaskResponse(task=convert.status_to_info(status))

    @rpc_method("CancelTask")
    async def CancelTask(  # noqa: N802 - gRPC method name
        self, request: pb.CancelTaskRequest, context: Any
    ) -> pb.CancelTaskResponse:
        """Cancel a queued or running task. Cancelling a cancelled task is a no-op."""
        task_id = normalize_task_id(request.task_id)
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
                await queries.task_cancel(conn, task_id=task_id, detail=detail)
            row = await queries.task_get(conn, task_id=task_id)
        if row is None:  # impossible inside the transaction that locked it; keeps mypy honest
            raise TaskNotFound(task_id=task_id)
        if state is not TaskState.CANCELLED:
            self.metrics.task_outcomes.labels(row["type"], "cancelled").inc()
        return pb.CancelTaskResponse(task=convert.status_to_info(status_from_row(row)))
