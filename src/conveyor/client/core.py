"""The I/O-free core shared by `Client` and `AsyncClient`.

Request building, response conversion and error translation. Both clients call the same
functions, so their behaviour cannot drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conveyor.errors import ConveyorError, InvalidTask
from conveyor.protocol import convert
from conveyor.protocol.status import TRANSIENT_CODES, error_from_status
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.types import Task, TaskStatus, new_task_id, normalize_task_id

if TYPE_CHECKING:
    from collections.abc import Sequence

    import grpc

MAX_BATCH = 1000


def enqueue_request(tasks: Sequence[Task]) -> pb.EnqueueTasksRequest:
    """Validate and number tasks; ids are fixed here so every retry sends the same ones."""
    if not tasks:
        raise InvalidTask("no tasks to enqueue")
    for task in tasks:
        if not isinstance(task, Task):
            raise InvalidTask(f"expected a conveyor.Task, got {type(task).__name__}")
    return pb.EnqueueTasksRequest(
        tasks=[convert.task_to_spec(task, task.id or new_task_id()) for task in tasks]
    )


def enqueue_batches(tasks: Sequence[Task]) -> list[pb.EnqueueTasksRequest]:
    """Split a large enqueue into requests the server accepts."""
    return [
        enqueue_request(tasks[start : start + MAX_BATCH])
        for start in range(0, max(len(tasks), 1), MAX_BATCH)
    ]


def get_request(task_id: str, *, history: bool) -> pb.GetTaskRequest:
    """A GetTask request for a validated id."""
    return pb.GetTaskRequest(task_id=normalize_task_id(task_id), include_history=history)


def cancel_request(task_id: str) -> pb.CancelTaskRequest:
    """A CancelTask request for a validated id."""
    return pb.CancelTaskRequest(task_id=normalize_task_id(task_id))


def status_from_response(response: pb.GetTaskResponse | pb.CancelTaskResponse) -> TaskStatus:
    """The TaskStatus carried by a response."""
    return convert.status_from_info(response.task)


def is_transient(error: grpc.RpcError) -> bool:
    """Whether a failed call may succeed if retried (possibly on another server)."""
    return error.code() in TRANSIENT_CODES


def translate(error: grpc.RpcError) -> ConveyorError:
    """The typed Conveyor error for a failed call."""
    return error_from_status(error.code(), error.details())
