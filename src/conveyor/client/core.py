"""The I/O-free core shared by `Client` and `AsyncClient`.

Request building, response conversion and error translation, and `OwningProcess`, which
tells a forked child that its parent's client is not its own. Both clients call the same
functions, so their behaviour cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Final, TypedDict

from conveyor.codec import SEALED_OVERHEAD, PayloadCodec, open_text
from conveyor.errors import ConfigError, ConveyorError, InvalidTask, SealError
from conveyor.protocol import convert
from conveyor.protocol.limits import PEER_MESSAGE_BYTES
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.text import not_utf8
from conveyor.types import (
    BulkResult,
    ClusterStatus,
    Task,
    TaskPage,
    TaskState,
    TaskStatus,
    WorkerInfo,
    WorkerPage,
    new_task_ids,
    normalize_task_id,
    validate_task_type,
)

if TYPE_CHECKING:
    from datetime import timedelta

# A filter's states: one state, several, or None for every state the call applies to.
StatesArg = TaskState | str | Sequence[TaskState | str] | None


MAX_BATCH = 1000
# Requests are also cut at about this many bytes. A server accepts messages of 16 MiB or
# more (more when its payload limit is higher), and a thousand tasks with large payloads
# would exceed that: the call then failed whole with RESOURCE_EXHAUSTED.
MAX_REQUEST_BYTES: Final = 8 * 1024 * 1024
# What a task adds to a request besides its payload and type (id, timeout, retries, the
# framing of each field), rounded up; the same for each trace context entry.
_TASK_FRAMING_BYTES: Final = 64


# Request templates for tasks without a trace context, by (type, timeout, retries), kept
# across calls: a producer enqueues a few kinds of task over and over, and building a
# TaskSpec with its Duration costs more than copying one. Bounded (cleared when full)
# against endless kinds.
_TEMPLATE_LIMIT: Final = 1024
_templates: dict[tuple[str, timedelta, int], pb.TaskSpec] = {}


def task_list(tasks: Iterable[Task]) -> list[Task]:
    """The caller's tasks as a list (any iterable will do: a generator is read once)."""
    if tasks is None or isinstance(tasks, (Task, str, bytes)):
        raise InvalidTask(
            f"tasks must be a list (or other iterable) of conveyor.Task, got "
            f"{type(tasks).__name__}; enqueue_task takes a single Task",
            field="tasks",
        )
    try:
        return list(tasks)
    except TypeError:
        raise InvalidTask(
            f"tasks must be a list (or other iterable) of conveyor.Task, got "
            f"{type(tasks).__name__}",
            field="tasks",
        ) from None


def _check_tasks(tasks: Sequence[Task]) -> None:
    for index, task in enumerate(tasks):
        if not isinstance(task, Task):
            raise InvalidTask(
                f"tasks[{index}]: expected a conveyor.Task, got {type(task).__name__}"
            )


def enqueue_request(
    tasks: Sequence[Task],
    trace_context: dict[str, str] | None = None,
    codec: PayloadCodec | None = None,
) -> pb.EnqueueTasksRequest:
    """Validate and number tasks; ids are fixed here so every retry sends the same ones.

    With a codec, payloads are sealed here, bound to their task's id: what leaves the
    client is what the server stores.
    """
    if not tasks:
        raise InvalidTask("no tasks to enqueue")
    _check_tasks(tasks)
    # Built in place: each spec is a copy of a template holding what tasks usually share
    # (type, timeout, retries, trace context), then gets its id and payload. A batch of
    # 1000 tasks costs about 1.5 ms here (ids included), against 9 with a TaskSpec and a
    # Duration built per task.
    request = pb.EnqueueTasksRequest()
    add = request.tasks.add
    context = trace_context or None
    # A traced request's templates carry its trace context: they serve this call only.
    templates = _templates if context is None else {}
    for task, fresh_id in zip(tasks, new_task_ids(len(tasks)), strict=True):
        key = (task.type, task.timeout_delta, task.max_retries)
        template = templates.get(key)
        if template is None:
            if len(templates) >= _TEMPLATE_LIMIT:
                templates.clear()
            template = templates[key] = pb.TaskSpec(
                type=task.type,
                timeout=convert.duration(task.timeout_delta),
                max_retries=task.max_retries,
                trace_context=context,
            )
        spec = add()
        spec.CopyFrom(template)
        spec.id = task.id or fresh_id
        if codec is not None:
            spec.payload = codec.seal(task.payload, field="payload", task_id=spec.id)
        elif task.payload:
            spec.payload = task.payload
    if len(tasks) == 1:
        # Only a lone task can make a request too large: enqueue_batches cuts several
        # tasks at about MAX_REQUEST_BYTES, far under any limit. Measuring a request is a
        # full encode (a tenth of the cost of building one of 1,000 tasks), not worth
        # paying for every request of a bulk enqueue.
        _check_request_size(request)
    return request


def _check_request_size(request: pb.EnqueueTasksRequest) -> None:
    # gRPC would refuse to send it with its own words ("CLIENT: Sent message larger than
    # max"), after the work of serialising it; no server accepts it either.
    size = request.ByteSize()
    if size > PEER_MESSAGE_BYTES:
        raise InvalidTask(
            f"the enqueue request is {size} bytes; a Conveyor client sends at most "
            f"{PEER_MESSAGE_BYTES} bytes in one message, and a server accepts a payload of "
            f"its max_payload_bytes only (1 MiB by default): store large data elsewhere "
            f"and pass a reference in the payload",
            field="payload",
        )


def enqueue_batches(
    tasks: Sequence[Task],
    trace_context: dict[str, str] | None = None,
    codec: PayloadCodec | None = None,
) -> list[pb.EnqueueTasksRequest]:
    """Split a large enqueue into requests the server accepts, in order.

    A request holds at most MAX_BATCH tasks and, by estimate, MAX_REQUEST_BYTES (a task
    larger than that goes alone).
    """
    if len(tasks) == 1:  # one task goes alone, however large
        return [enqueue_request(tasks, trace_context, codec)]
    _check_tasks(tasks)
    each = (
        _TASK_FRAMING_BYTES
        + (SEALED_OVERHEAD if codec is not None else 0)
        + sum(
            len(key) + len(value) + _TASK_FRAMING_BYTES
            for key, value in (trace_context or {}).items()
        )
    )
    sizes = [len(task.payload) + len(task.type) + each for task in tasks]
    if sum(sizes) <= MAX_REQUEST_BYTES:
        bounds = range(0, max(len(tasks), 1), MAX_BATCH)
        return [
            enqueue_request(tasks[start : start + MAX_BATCH], trace_context, codec)
            for start in bounds
        ]
    requests: list[pb.EnqueueTasksRequest] = []
    start = size = 0
    for end, task_size in enumerate(sizes):
        if end > start and (end - start == MAX_BATCH or size + task_size > MAX_REQUEST_BYTES):
            requests.append(enqueue_request(tasks[start:end], trace_context, codec))
            start, size = end, 0
        size += task_size
    requests.append(enqueue_request(tasks[start:], trace_context, codec))
    return requests


# How the server names a task of a request in an error: by its index in that request.
_TASK_INDEX: Final = re.compile(r"^tasks\[(\d+)\]")


def failed_part(error: ConveyorError, offset: int, committed: list[str]) -> ConveyorError:
    """`error`, raised by the request starting at the caller's task `offset`, as the caller's.

    The server numbers a bad task within its request; the caller knows it by its place in
    the whole list. The requests before this one committed (`committed`, their ids): the
    error carries them, so the caller can tell which tasks exist.
    """
    if offset:
        message = _TASK_INDEX.sub(lambda m: f"tasks[{int(m.group(1)) + offset}]", error.message)
        if message != error.message:
            error.args = (message, *error.args[1:])
    error.committed_ids = tuple(committed)
    return error


# A request's share of MAX_REQUEST_BYTES when calls are joined into one (see
# `request_weight`): every task weighs at least this, so a joined request also stays
# within MAX_BATCH tasks.
_TASK_WEIGHT: Final = MAX_REQUEST_BYTES // MAX_BATCH


def task_count(request: pb.EnqueueTasksRequest) -> int:
    """How many tasks (and so ids in the answer) a request carries."""
    return len(request.tasks)


def request_weight(request: pb.EnqueueTasksRequest) -> int:
    """A request's weight, out of MAX_REQUEST_BYTES, when concurrent enqueues are joined."""
    by_count = len(request.tasks) * _TASK_WEIGHT
    if by_count >= MAX_REQUEST_BYTES:
        # Full (MAX_BATCH tasks): it goes alone whatever its size, which enqueue_batches
        # kept at about MAX_REQUEST_BYTES; measuring it would be a full encode.
        return by_count
    return max(by_count, request.ByteSize())


def joined_requests(requests: list[pb.EnqueueTasksRequest]) -> pb.EnqueueTasksRequest:
    """One request carrying the tasks of several, in order (each keeps its trace context)."""
    joined = pb.EnqueueTasksRequest()
    for request in requests:
        joined.tasks.extend(request.tasks)
    return joined


def may_concern_one_call(error: Exception) -> bool:
    """Whether a joined request's error may be about some of its calls' tasks only.

    Only an invalid task (INVALID_ARGUMENT: one call's task over a server limit the client
    cannot know, such as the payload limit) is answered per call, by sending each call on
    its own. Anything else (unavailable, internal, refused credentials) concerns the whole
    request, and splitting it would only multiply the round trips.
    """
    return isinstance(error, InvalidTask)


class EnqueueJoining(TypedDict):
    """How both clients join concurrent enqueues (the arguments of their group commit)."""

    combine: Callable[[list[pb.EnqueueTasksRequest]], pb.EnqueueTasksRequest]
    count: Callable[[pb.EnqueueTasksRequest], int]
    weigh: Callable[[pb.EnqueueTasksRequest], int]
    max_weight: int
    split_on: Callable[[Exception], bool]


ENQUEUE_JOINING: Final[EnqueueJoining] = {
    "combine": joined_requests,
    "count": task_count,
    "weigh": request_weight,
    "max_weight": MAX_REQUEST_BYTES,
    "split_on": may_concern_one_call,
}


def get_request(
    task_id: str, *, history: bool, payload: bool = False, explain: bool = False
) -> pb.GetTaskRequest:
    """A GetTask request for a validated id."""
    return pb.GetTaskRequest(
        task_id=normalize_task_id(task_id),
        include_history=checked_flag(history, "history"),
        include_payload=checked_flag(payload, "payload"),
        include_explanation=checked_flag(explain, "explain"),
    )


def cancel_request(task_id: str) -> pb.CancelTaskRequest:
    """A CancelTask request for a validated id."""
    return pb.CancelTaskRequest(task_id=normalize_task_id(task_id))


def status_from_response(
    response: pb.GetTaskResponse | pb.CancelTaskResponse, codec: PayloadCodec | None = None
) -> TaskStatus:
    """The TaskStatus carried by a response, opened with `codec` if given."""
    status = convert.status_from_info(response.task)
    return opened(status, codec) if codec is not None else status


def opened(status: TaskStatus, codec: PayloadCodec) -> TaskStatus:
    """`status` with its payload, result and error messages opened.

    A payload or result that cannot be opened raises SealError: the application would act
    on it. An error message that cannot be opened stays sealed: it is for people, and the
    rest of the status is still worth having. Plain values pass through: tasks from
    producers without a codec, and the server's own messages (a lease that expired).
    """
    task_id = status.id
    return dataclasses.replace(
        status,
        payload=codec.open(status.payload, field="payload", task_id=task_id)
        if status.payload is not None
        else None,
        result=codec.open(status.result, field="result", task_id=task_id)
        if status.result is not None
        else None,
        last_error=_opened_text(codec, status.last_error, task_id),
        progress=_opened_text(codec, status.progress, task_id, field="progress"),
        history=tuple(
            dataclasses.replace(event, detail=_opened_text(codec, event.detail, task_id))
            if event.detail
            else event
            for event in status.history
        ),
    )


def _opened_text(
    codec: PayloadCodec, text: str | None, task_id: str, *, field: str = "error"
) -> str | None:
    if not text:
        return text
    try:
        return open_text(codec, text, field=field, task_id=task_id)
    except SealError:
        return text


def list_workers_request(
    *, include_stopped: bool, limit: int, page_token: str | None = None
) -> pb.ListWorkersRequest:
    """A ListWorkers request."""
    limit = checked_limit(limit, least=1, most=MAX_PAGE_LIMIT)
    return pb.ListWorkersRequest(
        include_stopped=checked_flag(include_stopped, "include_stopped"),
        limit=limit,
        page_token=checked_page_token(page_token),
    )


def workers_from_response(response: pb.ListWorkersResponse) -> list[WorkerInfo]:
    """The workers carried by a response."""
    return [convert.worker_from_pb(info) for info in response.workers]


def worker_page_from_response(response: pb.ListWorkersResponse) -> WorkerPage:
    """A page of the workers listing; `total` is None from a server older than it."""
    return WorkerPage(
        workers=tuple(workers_from_response(response)),
        total=response.total if response.HasField("total") else None,
        next_page_token=response.next_page_token or None,
    )


def explain_request(task_id: str) -> pb.ExplainTaskRequest:
    """An ExplainTask request for a validated id."""
    return pb.ExplainTaskRequest(task_id=normalize_task_id(task_id))


# The largest `limit` each request's field carries (uint32 for pages, uint64 for bulk).
MAX_PAGE_LIMIT: Final = 2**32 - 1
MAX_BULK_LIMIT: Final = 2**64 - 1


# Protobuf's own refusal of a wrong type is a TypeError naming a message field the caller
# never saw ("bad argument type for built-in operation"); these name the argument.
def checked_flag(value: object, name: str) -> bool:
    """`value` if it is a bool; InvalidTask if not (a "yes" is no flag)."""
    if not isinstance(value, bool):
        raise InvalidTask(f"{name} must be True or False, got {type(value).__name__}", field=name)
    return value


def checked_page_token(token: object) -> str:
    """A page token as sent: "" for none; InvalidTask if it is not a str."""
    if token is None:
        return ""
    if not isinstance(token, str):
        raise InvalidTask(
            f"page_token must be the str of a page's next_page_token, got {type(token).__name__}",
            field="page_token",
        )
    # From a command line, bytes that are not UTF-8 arrive as lone surrogates.
    return _sendable_text(token, "page_token", "give a page's next_page_token as it was")


def checked_limit(limit: object, *, least: int, most: int) -> int:
    """`limit` if it is a whole number from `least` to `most`; InvalidTask if not."""
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidTask(f"limit must be an int, got {type(limit).__name__}", field="limit")
    if not least <= limit <= most:
        raise InvalidTask(f"limit must be from {least} to {most}, got {limit}", field="limit")
    return limit


def checked_reason(reason: object) -> str:
    """`reason` if it is text that can travel (UTF-8); InvalidTask if not.

    A command-line argument that is not UTF-8 arrives as lone surrogates (surrogateescape),
    which protobuf refused with a UnicodeEncodeError traceback; after a bulk action's
    confirmation, too.
    """
    if not isinstance(reason, str):
        raise InvalidTask(f"reason must be a str, got {type(reason).__name__}", field="reason")
    return _sendable_text(reason, "reason", "give the reason as text")


def _sendable_text(text: str, field: str, advice: str) -> str:
    """`text` if protobuf can send it (UTF-8); InvalidTask naming `field` if not."""
    bad = not_utf8(text)
    if bad is not None:
        raise InvalidTask(
            f"{field} holds {bad!r}, which is not a character (bytes that are not UTF-8?); "
            f"{advice}",
            field=field,
        )
    return text


def _states(states: StatesArg) -> list[TaskState]:
    if states is None:
        return []
    if isinstance(states, (TaskState, str)):
        items: list[TaskState | str] = [states]
    else:
        try:
            items = list(states)
        except TypeError:
            known = ", ".join(state.value for state in TaskState)
            raise InvalidTask(
                f"states must be a task state or a list of them ({known}), got "
                f"{type(states).__name__}",
                field="states",
            ) from None
    if not items:
        # Read as "no filter", it would match every state: a bulk cancel given an empty
        # selection (no box ticked) cancelled every queued and running task.
        raise InvalidTask(
            "states is empty: give at least one state, or leave states out for every state",
            field="states",
        )
    parsed = []
    for item in items:
        try:
            parsed.append(TaskState(item))
        except (ValueError, TypeError):
            known = ", ".join(state.value for state in TaskState)
            raise InvalidTask(f"unknown task state {item!r} (one of {known})") from None
    return parsed


def task_filter(states: StatesArg, task_type: str | None) -> pb.TaskFilter:
    """A validated TaskFilter."""
    return pb.TaskFilter(
        states=convert.states_to_pb(_states(states)),
        type=validate_task_type(task_type) if task_type is not None else "",
    )


def list_tasks_request(
    states: StatesArg, task_type: str | None, limit: int, page_token: str | None
) -> pb.ListTasksRequest:
    """A ListTasks request."""
    limit = checked_limit(limit, least=1, most=MAX_PAGE_LIMIT)
    return pb.ListTasksRequest(
        filter=task_filter(states, task_type),
        limit=limit,
        page_token=checked_page_token(page_token),
    )


def page_from_response(
    response: pb.ListTasksResponse, codec: PayloadCodec | None = None
) -> TaskPage:
    """The page carried by a ListTasks response, its tasks opened with `codec` if given."""
    statuses = (convert.status_from_info(info) for info in response.tasks)
    return TaskPage(
        tasks=tuple(opened(s, codec) if codec is not None else s for s in statuses),
        next_page_token=response.next_page_token or None,
    )


def bulk_request(
    task_ids: Sequence[str],
    *,
    states: StatesArg,
    task_type: str | None,
    dry_run: bool,
    limit: int,
    reason: str,
    as_of: str | None = None,
) -> pb.BulkTaskRequest:
    """A retry or cancel request: by ids, or by a filter when no ids are given."""
    if isinstance(task_ids, (str, bytes)) or not isinstance(task_ids, Iterable):
        raise InvalidTask(
            f"task_ids must be a list of ids, got {type(task_ids).__name__}", field="task_ids"
        )
    task_ids = list(task_ids)
    limit = checked_limit(limit, least=0, most=MAX_BULK_LIMIT)
    by_filter = states is not None or task_type is not None
    if task_ids and by_filter:
        raise InvalidTask("give either task ids or a filter (states/type), not both")
    if not task_ids and not by_filter:
        raise InvalidTask("give task ids, or a filter: states and/or type")
    if as_of is not None and (
        task_ids
        or not isinstance(as_of, str)
        or not as_of.isascii()
        or not as_of.isdigit()
        # through_seq is a uint64: a larger number would be protobuf's ValueError (and
        # one of over 4,300 digits int()'s own).
        or len(as_of) > len(str(MAX_BULK_LIMIT))
        or int(as_of) > MAX_BULK_LIMIT
    ):
        raise InvalidTask("as_of is the as_of of a dry run's result, and only with a filter")
    request = pb.BulkTaskRequest(
        dry_run=checked_flag(dry_run, "dry_run"), limit=limit, reason=checked_reason(reason)
    )
    if task_ids:
        request.task_ids.extend(normalize_task_id(task_id) for task_id in task_ids)
    else:
        request.filter.CopyFrom(task_filter(states, task_type))
        request.through_seq = int(as_of) if as_of else 0
    return request


class BulkTally:
    """Adds up a bulk action that the server answers in several short calls.

    A call by filter stops after a couple of seconds and says where (`next_after_seq`);
    `next_request` continues from there, over the same tasks (`through_seq`) and within what
    is left of the limit. A call repeated after a lost reply resumes from the same place, so
    nothing is done twice; its changes are then missing from the total (they were made by
    the call whose reply was lost).
    """

    def __init__(self, request: pb.BulkTaskRequest) -> None:
        """Start with the first request."""
        self._request = request
        self._changed = 0
        self._first: pb.BulkTaskResponse | None = None
        self._through_seq = 0

    def next_request(self, response: pb.BulkTaskResponse) -> pb.BulkTaskRequest | None:
        """Count `response`; the request that continues the action, or None when done."""
        if self._first is None:
            self._first = response
        self._changed += response.changed
        self._through_seq = response.through_seq or self._through_seq
        request = self._request
        if response.complete or request.dry_run or request.task_ids:
            return None
        follow_up = pb.BulkTaskRequest()
        follow_up.CopyFrom(request)
        follow_up.through_seq = response.through_seq
        follow_up.after_seq = response.next_after_seq
        if request.limit:
            follow_up.limit = request.limit - self._changed
            if follow_up.limit <= 0:
                return None
        return follow_up

    def result(self) -> BulkResult:
        """The whole action's result."""
        assert self._first is not None  # noqa: S101 - next_request ran at least once
        first = convert.bulk_result_from_pb(self._first)
        if self._request.task_ids:
            return first
        as_of = str(self._through_seq) if self._through_seq else None
        if self._request.dry_run:
            return BulkResult(matched=first.matched, changed=0, as_of=as_of)
        return BulkResult(matched=self._changed, changed=self._changed, as_of=as_of)


def status_from_get_status(response: pb.GetStatusResponse) -> ClusterStatus:
    """The cluster status carried by a GetStatus response."""
    return convert.cluster_status_from_pb(response)


FORKED: Final = (
    "{client} cannot be used across fork(): it was created in process {pid}, which held "
    "gRPC connections when it forked, and a child of such a process cannot connect at all "
    "(gRPC's limit). Start children with the 'spawn' or 'forkserver' method, or connect "
    "only after the fork (in a prefork web server: a client made at import is fine if the "
    "parent never calls it)"
)


@dataclasses.dataclass(slots=True)
class OwningProcess:
    """The process a client belongs to: its connections work there and nowhere else.

    gRPC's fork support is off (see conveyor/__init__.py), so a forked child's copies of
    its parent's channels never answer: a call waited out the whole retry budget (30 s by
    default), then blamed the server. `check` says so at once instead. A child of a parent
    that held no connections adopts the clients it inherits unused (`channel.Adoptable`).
    """

    # How the error names the client: "a Client", "an AsyncClient".
    client: str
    pid: int = dataclasses.field(default_factory=os.getpid)
    # Whether a call began in this process: from then on, a thread of it may hold a lock
    # (Python's import lock, as grpc imports its channel module on the first channel) that
    # a forked child would never see released, so the child must not adopt the client.
    called: bool = False

    @property
    def forked(self) -> bool:
        """Whether this is a child forked since the client was created."""
        return self.pid != os.getpid()

    def check(self) -> None:
        """Raise ConfigError in a forked child; otherwise note that a call began."""
        if self.forked:
            raise ConfigError(FORKED.format(client=self.client, pid=self.pid))
        self.called = True

    def adopt(self) -> None:
        """Belong to this process from now on."""
        self.pid = os.getpid()
