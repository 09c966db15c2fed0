"""The I/O-free core shared by `Client` and `AsyncClient`.

Request building, response conversion and error translation. Both clients call the same
functions, so their behaviour cannot drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conveyor.errors import InvalidTask
from conveyor.protocol import convert
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.types import Task, TaskStatus, WorkerInfo, new_task_id, normalize_task_id

if TYPE_CHECKING:
    from collections.abc import Sequence


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


def list_workers_request(*, include_stopped: bool, limit: int) -> pb.ListWorkersRequest:
    """A ListWorkers request."""
    if limit < 1:
        raise InvalidTask("limit must be at least 1")
    return pb.ListWorkersRequest(include_stopped=include_stopped, limit=limit)


def workers_from_response(response: pb.ListWorkersResponse) -> list[WorkerInfo]:
    """The workers carried by a response."""
    return [convert.worker_from_pb(info) for info in response.workers]


def explain_request(task_id: str) -> pb.ExplainTaskRequest:
    """An ExplainTask request for a validated id."""
    return pb.ExplainTaskRequest(task_id=normalize_task_id(task_id))
