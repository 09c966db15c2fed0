"""Conversions between the leaf types (`conveyor.types`) and protobuf messages.

The only hand-written module that imports the generated `*_pb2` code, besides the
servicers and stubs that must name the generated service classes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.errors import InvalidTask
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.types import (
    BulkResult,
    ClusterStatus,
    OtherTypes,
    PausedType,
    Task,
    TaskEvent,
    TaskState,
    TaskStatus,
    TypeStatus,
    WorkerInfo,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

STATE_TO_PB: Final = {
    TaskState.QUEUED: pb.TASK_STATE_QUEUED,
    TaskState.RUNNING: pb.TASK_STATE_RUNNING,
    TaskState.SUCCEEDED: pb.TASK_STATE_SUCCEEDED,
    TaskState.FAILED: pb.TASK_STATE_FAILED,
    TaskState.CANCELLED: pb.TASK_STATE_CANCELLED,
}
STATE_FROM_PB: Final = {value: key for key, value in STATE_TO_PB.items()}


# protobuf's own conversions (`FromTimedelta`, `FromDatetime`, `ToDatetime`) are Python
# code with range checks, 3-4 µs each; a lease carries three of these values, so both ends
# convert with integer arithmetic instead. The results are protobuf's canonical forms:
# a Duration's seconds and nanos share a sign, a Timestamp's nanos are never negative.
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROS_PER_SECOND: Final = 1_000_000
_NANOS_PER_MICRO: Final = 1_000
_SECONDS_PER_DAY: Final = 86_400


def wire_text(text: str) -> str:
    r"""`text` as a protobuf string field can carry it.

    Python strings may hold lone surrogates (a file name that did not decode, through
    os.fsdecode, in an exception or a progress note), which protobuf refuses to encode.
    They become backslash escapes (`\udce9`), readable and never failing the message.
    """
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def duration(value: timedelta) -> Duration:
    """A protobuf Duration for `value`."""
    micros = (value.days * _SECONDS_PER_DAY + value.seconds) * _MICROS_PER_SECOND
    micros += value.microseconds
    whole, rest = divmod(abs(micros), _MICROS_PER_SECOND)
    sign = -1 if micros < 0 else 1
    return Duration(seconds=sign * whole, nanos=sign * rest * _NANOS_PER_MICRO)


def seconds(message: Duration) -> float:
    """A Duration from a trusted peer (the server), in seconds."""
    return message.seconds + message.nanos / 1e9


def from_duration(message: Duration, *, field: str) -> timedelta:
    """A timedelta from a Duration received from a peer; InvalidTask if out of range."""
    try:
        return message.ToTimedelta()
    except (OverflowError, ValueError):
        raise InvalidTask(
            f"{field} is out of range ({message.seconds}s {message.nanos}ns)", field=field
        ) from None


def timestamp(value: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp for `value`, naive meaning UTC (None stays None: left unset)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return Timestamp(
        seconds=delta.days * _SECONDS_PER_DAY + delta.seconds,
        nanos=delta.microseconds * _NANOS_PER_MICRO,
    )


def from_timestamp(message: Timestamp) -> datetime:
    """An aware UTC datetime from a Timestamp (sent by the server: in datetime's range)."""
    return _EPOCH + timedelta(
        seconds=message.seconds, microseconds=message.nanos // _NANOS_PER_MICRO
    )


def task_to_spec(
    task: Task, task_id: str, trace_context: dict[str, str] | None = None
) -> pb.TaskSpec:
    """The wire form of a task about to be enqueued under `task_id`."""
    return pb.TaskSpec(
        id=task_id,
        type=task.type,
        payload=task.payload,
        timeout=duration(task.timeout_delta),
        max_retries=task.max_retries,
        trace_context=trace_context,
    )


def status_from_info(info: pb.TaskInfo) -> TaskStatus:
    """A TaskStatus from the wire form."""
    return TaskStatus(
        id=info.id,
        type=info.type,
        state=STATE_FROM_PB[info.state],
        attempts=info.attempts,
        max_retries=info.max_retries,
        created_at=from_timestamp(info.created_at),
        started_at=from_timestamp(info.started_at) if info.HasField("started_at") else None,
        finished_at=from_timestamp(info.finished_at) if info.HasField("finished_at") else None,
        last_error=info.last_error or None,
        worker_id=info.worker_id or None,
        result=info.result if info.has_result else None,
        timeout=info.timeout.ToTimedelta(),
        available_at=(from_timestamp(info.available_at) if info.HasField("available_at") else None),
        progress=info.progress or None,
        progress_at=from_timestamp(info.progress_at) if info.HasField("progress_at") else None,
        payload=info.payload if info.has_payload else None,
        history=tuple(
            TaskEvent(
                at=from_timestamp(event.at),
                event=event.event,
                state=STATE_FROM_PB[event.state],
                attempt=event.attempt,
                worker_id=event.worker_id or None,
                detail=event.detail or None,
                actor=event.actor or None,
            )
            for event in info.history
        ),
        history_omitted=info.history_omitted,
        explanation=tuple(info.explanation),
    )


def status_to_info(status: TaskStatus) -> pb.TaskInfo:
    """The wire form of a TaskStatus."""
    return pb.TaskInfo(
        id=status.id,
        type=status.type,
        state=STATE_TO_PB[status.state],
        attempts=status.attempts,
        max_retries=status.max_retries,
        created_at=timestamp(status.created_at),
        started_at=timestamp(status.started_at),
        finished_at=timestamp(status.finished_at),
        last_error=status.last_error or "",
        worker_id=status.worker_id or "",
        result=status.result or b"",
        has_result=status.result is not None,
        timeout=duration(status.timeout),
        available_at=timestamp(status.available_at),
        progress=status.progress or "",
        progress_at=timestamp(status.progress_at),
        payload=status.payload or b"",
        has_payload=status.payload is not None,
        history=[
            pb.TaskEvent(
                at=timestamp(event.at),
                event=event.event,
                state=STATE_TO_PB[event.state],
                attempt=event.attempt,
                worker_id=event.worker_id or "",
                detail=event.detail or "",
                actor=event.actor or "",
            )
            for event in status.history
        ],
        history_omitted=status.history_omitted,
        explanation=status.explanation,
    )


def worker_to_pb(info: WorkerInfo) -> pb.WorkerInfo:
    """The wire form of a WorkerInfo."""
    return pb.WorkerInfo(
        id=info.id,
        host=info.host,
        pid=info.pid,
        task_types=list(info.task_types),
        concurrency=info.concurrency,
        version=info.version,
        state=info.state,
        started_at=timestamp(info.started_at),
        last_heartbeat_at=timestamp(info.last_heartbeat_at),
        in_flight=info.in_flight,
        loop_lag_ms=info.loop_lag_ms,
        silent_for=duration(info.silent_for) if info.silent_for is not None else None,
    )


def worker_from_pb(info: pb.WorkerInfo) -> WorkerInfo:
    """A WorkerInfo from the wire form."""
    return WorkerInfo(
        id=info.id,
        host=info.host,
        pid=info.pid,
        task_types=tuple(info.task_types),
        concurrency=info.concurrency,
        version=info.version,
        state=info.state,
        started_at=from_timestamp(info.started_at),
        last_heartbeat_at=from_timestamp(info.last_heartbeat_at),
        in_flight=info.in_flight,
        loop_lag_ms=info.loop_lag_ms,
        silent_for=timedelta(seconds=seconds(info.silent_for))
        if info.HasField("silent_for")
        else None,
    )


def states_to_pb(states: Sequence[TaskState]) -> list[pb.TaskState.ValueType]:
    """Wire values of task states."""
    return [STATE_TO_PB[state] for state in states]


def states_from_pb(values: Sequence[int]) -> list[TaskState]:
    """Task states from wire values; InvalidTask names an unknown one."""
    states = []
    for value in values:
        state = STATE_FROM_PB.get(value)  # type: ignore[call-overload]
        if state is None:
            raise InvalidTask(f"unknown task state {value}", field="states")
        states.append(state)
    return states


def paused_type_to_pb(paused: PausedType) -> pb.PausedType:
    """The wire form of a paused type."""
    return pb.PausedType(
        type=paused.type,
        paused_at=timestamp(paused.paused_at),
        reason=paused.reason or "",
        paused_by=paused.paused_by or "",
    )


def paused_type_from_pb(message: pb.PausedType) -> PausedType:
    """A PausedType from the wire form."""
    return PausedType(
        type=message.type,
        paused_at=from_timestamp(message.paused_at),
        reason=message.reason or None,
        paused_by=message.paused_by or None,
    )


def bulk_result_to_pb(result: BulkResult) -> pb.BulkTaskResponse:
    """The wire form of a bulk action's result."""
    return pb.BulkTaskResponse(
        matched=result.matched,
        changed=result.changed,
        changed_ids=list(result.changed_ids),
        skipped=[
            pb.SkippedTask(task_id=task_id, state=STATE_TO_PB[state])
            for task_id, state in result.skipped
        ],
    )


def bulk_result_from_pb(message: pb.BulkTaskResponse) -> BulkResult:
    """A BulkResult from the wire form."""
    return BulkResult(
        matched=message.matched,
        changed=message.changed,
        changed_ids=tuple(message.changed_ids),
        skipped=tuple((item.task_id, STATE_FROM_PB[item.state]) for item in message.skipped),
    )


def cluster_status_to_pb(status: ClusterStatus) -> pb.GetStatusResponse:
    """The wire form of the cluster status."""
    return pb.GetStatusResponse(
        version=status.version,
        server_id=status.server_id,
        is_leader=status.is_leader,
        leader_id=status.leader_id or "",
        leader_term=status.leader_term,
        sampled_at=timestamp(status.sampled_at),
        types=[
            pb.TypeStatus(
                type=item.type,
                queued=item.queued,
                running=item.running,
                oldest_queued_seconds=item.oldest_queued_seconds,
                paused=item.paused,
            )
            for item in status.types
        ],
        workers=status.workers,
        succeeded_last_minute=status.succeeded_last_minute,
        failed_last_minute=status.failed_last_minute,
        retried_last_minute=status.retried_last_minute,
        started_last_minute=status.started_last_minute,
        paused_types=[paused_type_to_pb(paused) for paused in status.paused_types],
        last_minute_seconds=status.last_minute_seconds,
        other_types=pb.OtherTypes(
            types=status.other_types.types,
            queued=status.other_types.queued,
            running=status.other_types.running,
            oldest_queued_seconds=status.other_types.oldest_queued_seconds,
        ),
    )


def cluster_status_from_pb(message: pb.GetStatusResponse) -> ClusterStatus:
    """A ClusterStatus from the wire form."""
    return ClusterStatus(
        version=message.version,
        server_id=message.server_id,
        is_leader=message.is_leader,
        leader_id=message.leader_id or None,
        leader_term=message.leader_term,
        sampled_at=from_timestamp(message.sampled_at) if message.HasField("sampled_at") else None,
        types=tuple(
            TypeStatus(
                type=item.type,
                queued=item.queued,
                running=item.running,
                oldest_queued_seconds=item.oldest_queued_seconds,
                paused=item.paused,
            )
            for item in message.types
        ),
        workers=dict(message.workers),
        succeeded_last_minute=message.succeeded_last_minute,
        failed_last_minute=message.failed_last_minute,
        retried_last_minute=message.retried_last_minute,
        started_last_minute=message.started_last_minute,
        paused_types=tuple(paused_type_from_pb(item) for item in message.paused_types),
        # 0 from a server older than the field; its counts covered about a minute.
        last_minute_seconds=message.last_minute_seconds or 60.0,
        other_types=OtherTypes(
            types=message.other_types.types,
            queued=message.other_types.queued,
            running=message.other_types.running,
            oldest_queued_seconds=message.other_types.oldest_queued_seconds,
        ),
    )
