"""Client: the blocking producer API (enqueue, status, cancel) over a gRPC channel."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar, cast

import grpc

from conveyor.client import core, tracing
from conveyor.client.channel import (
    AddressRing,
    Credentials,
    RetryLoop,
    RetryPolicy,
    TlsConfig,
    adoptable_after_fork,
    parse_addresses,
    retry_policy,
)
from conveyor.client.enqueue_stream import (
    BlockingEnqueueStream,
    EnqueueRoute,
    StreamEnded,
)
from conveyor.codec import PayloadCodec, chosen_codec
from conveyor.errors import ConfigError, ConveyorError
from conveyor.group_commit import BlockingGroupCommit
from conveyor.protocol.limits import DEFAULT_WORKERS_PER_PAGE
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.types import validate_task_type

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from types import TracebackType

    from conveyor.breaker import BreakerPolicy
    from conveyor.client.core import StatesArg
    from conveyor.types import (
        BulkResult,
        ClusterStatus,
        Task,
        TaskPage,
        TaskStatus,
        WorkerInfo,
        WorkerPage,
    )

Response = TypeVar("Response")

CLOSED: Final = "this Client is closed: create a new one (a closed client opens no connections)"


class Client:
    """Enqueue tasks, read their status, cancel them.

    Args:
        server: "host:port", "host1:port,host2:port", or a list. Defaults to the
            CONVEYOR_SERVER environment variable, then localhost:50051.
        retry: Deadlines and retry schedule for transient failures.
        token: The bearer token to present (see docs/security.md). Defaults to the
            CONVEYOR_TOKEN environment variable, then the file named by CONVEYOR_TOKEN_FILE;
            none at all suits a server without authentication (local development).
        tls: TLS towards the servers: a TlsConfig, True for the system's trusted roots,
            False for plain text. Defaults to the CONVEYOR_TLS* environment variables,
            then plain text.
        codec: Seals payloads before they leave and opens payloads, results and errors
            read back (see conveyor.codec and docs/security.md). Defaults to an AesGcmCodec
            from CONVEYOR_PAYLOAD_KEYS when that is set, else none.
        breaker: When a server's circuit opens, and for how long.

    Every call has a deadline; transient failures are retried on the next server with
    backoff until `retry.total_timeout`, then raise ServerUnavailable (CircuitOpen when
    every server's breaker is open and no probe is due within the budget). Retrying is
    safe: an enqueue carries its task ids, so a repeat returns the existing tasks.

    Share one client between threads: enqueues made while others are in flight go
    together in one request. Such an enqueue first waits for a request in flight, so in an
    outage it can take up to twice `retry.total_timeout` to raise.

    After `close()`, every call raises ConfigError, and calls still in flight on other
    threads finish or raise it too: a closed client opens no connection again. A client
    belongs to the process that created it: a forked child gets ConfigError at once, and
    creates its own, which works only if this process held no connections when it forked
    (otherwise ConfigError again: gRPC cannot connect from such a child; use the 'spawn'
    or 'forkserver' start method).
    """

    def __init__(
        self,
        server: str | Sequence[str] | None = None,
        *,
        token: str | None = None,
        tls: TlsConfig | bool | None = None,
        codec: PayloadCodec | None = None,
        retry: RetryPolicy | None = None,
        breaker: BreakerPolicy | None = None,
    ) -> None:
        """Prepare channels; connections open lazily on the first call."""
        self._ring = AddressRing(parse_addresses(server), breaker)
        self._credentials = Credentials.resolve(token, tls)
        self._credentials.check(*self._ring.addresses)
        self._metadata = self._credentials.metadata
        self._codec = chosen_codec(codec)
        self._retry = retry_policy(retry)
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[tuple[str, str], Any] = {}
        self._channels_lock = threading.Lock()
        # Enqueues go on one stream per server, as in AsyncClient (see enqueue_stream.py).
        self._enqueue_streams: dict[str, BlockingEnqueueStream] = {}
        self._calls_only_until: dict[str, float] = {}
        self._closed = False
        self._owner = core.OwningProcess("a Client")
        # A client dropped without close() (one per web request, say) must not leave its
        # streams' threads and calls behind: they do not refer to the client, so it is
        # collected, and this ends them.
        weakref.finalize(self, _drop_streams, self._enqueue_streams)
        # Threads that enqueue while this client's requests are in flight go together in
        # one request, as in AsyncClient (see conveyor/group_commit.py).
        self._enqueues = self._group_commit()
        adoptable_after_fork(self)

    def _group_commit(self) -> BlockingGroupCommit[pb.EnqueueTasksRequest, str]:
        return BlockingGroupCommit(self._send_enqueue, **core.ENQUEUE_JOINING)

    def _adopt_if_unused(self) -> None:
        """Internal (channel.Adoptable): a forked child takes over a client never used."""
        if self._owner.called or self._closed:
            return
        self._channels_lock = threading.Lock()
        self._enqueues = self._group_commit()
        self._owner.adopt()

    def _check_usable(self) -> None:
        """Raise ConfigError if the client was closed, or is used in a forked child."""
        self._owner.check()
        if self._closed:
            raise ConfigError(CLOSED)

    def _channel(self, address: str) -> grpc.Channel:
        # Threads may share a client: one channel per address, never two (the caller holds
        # the lock). A closed client opens none, even for a retry of a call in flight.
        self._check_usable()
        channel = self._channels.get(address)
        if channel is None:
            channel = self._credentials.open_channel(address, aio=False)
            self._channels[address] = channel
        return channel

    def _stub(self, address: str, service: str = "TaskService") -> Any:
        # One stub per channel and service (see AsyncClient._stub).
        stub = self._stubs.get((address, service))
        if stub is not None:
            return stub
        with self._channels_lock:
            stub = self._stubs.get((address, service))
            if stub is None:
                stub = getattr(pb_grpc, f"{service}Stub")(self._channel(address))
                self._stubs[(address, service)] = stub
        return stub

    def _call(self, method: str, request: Any, service: str = "TaskService") -> Any:
        return self._retrying(
            method,
            lambda address, timeout: _off_the_main_thread(
                getattr(self._stub(address, service), method),
                request,
                timeout=timeout,
                metadata=self._metadata,
            ),
        )

    def _retrying(self, method: str, attempt: Callable[[str, float], Response]) -> Response:
        """`attempt(address, timeout)` until it answers, as `RetryLoop` decides."""
        self._check_usable()
        attempts = RetryLoop(
            self._ring,
            self._retry,
            method,
            clock=time.monotonic,
            token_sent=self._metadata is not None,
            tls=self._credentials.tls is not None,
        )
        while True:
            pick, pause = attempts.step()
            if pick is None:
                time.sleep(pause)
                continue
            try:
                response = attempt(pick.address, attempts.call_timeout())
            except grpc.RpcError as exc:  # a failed call, or a request failed on a stream
                if self._closed:
                    # close() ended it (CANCELLED, or the stream closed): not the server.
                    attempts.abandoned(pick)
                    raise ConfigError(CLOSED) from None
                attempts.failed(pick, exc)
                continue
            except BaseException as exc:
                # Interrupted (KeyboardInterrupt): a probe's breaker must not wait for ever.
                attempts.abandoned(pick)
                if self._closed and isinstance(exc, Exception):
                    # grpc's "Cannot invoke RPC on closed channel!" to a call that had its
                    # stub before close().
                    raise ConfigError(CLOSED) from exc
                raise
            attempts.succeeded(pick)
            return response

    def enqueue_task(self, task: Task) -> str:
        """Enqueue one task; return its id."""
        return self.enqueue_tasks([task])[0]

    def enqueue_tasks(self, tasks: Iterable[Task]) -> list[str]:
        """Enqueue many tasks in as few round trips as possible; return their ids in order.

        Tasks go in requests of up to 1,000 (and about 8 MiB), each committed on its own.
        If one fails, the error names the task by its place in `tasks`, and its
        `committed_ids` are the tasks the requests before it created: set ids on your
        tasks, or enqueue only the others, before trying again.
        """
        self._check_usable()
        tasks = core.task_list(tasks)
        ids: list[str] = []
        types = (getattr(task, "type", "?") for task in tasks)
        with tracing.enqueue_span(types, len(tasks)) as trace_context:
            for request in core.enqueue_batches(tasks, trace_context, self._codec):
                try:
                    ids.extend(self._enqueues.submit(request))
                except ConveyorError as exc:
                    core.failed_part(exc, len(ids), ids)
                    raise
        return ids

    def _send_enqueue(self, request: pb.EnqueueTasksRequest) -> Sequence[str]:
        return self._retrying(
            "EnqueueTasks", lambda address, timeout: self._enqueue_once(address, request, timeout)
        ).task_ids

    def _enqueue_once(
        self, address: str, request: pb.EnqueueTasksRequest, timeout: float
    ) -> pb.EnqueueTasksResponse:
        """One attempt, as `AsyncClient._enqueue_once` makes it."""
        route = EnqueueRoute(self._calls_only_until, address, time.monotonic(), timeout, request)
        while route.on_stream():
            with self._channels_lock:
                self._check_usable()
                stream = self._enqueue_streams.get(address)
                stream_was_new = stream is None or stream.ended
                if stream is None or stream.ended:
                    stream = BlockingEnqueueStream(self._channel(address), self._metadata)
                    self._enqueue_streams[address] = stream
            try:
                return stream.send(request, route.send_timeout(time.monotonic()))
            except StreamEnded as exc:
                route.stream_ended(exc, stream_was_new)
        # The unary fallback is a blocking grpc call like `_call`'s, so it runs off the
        # main thread for the same reason (see `_off_the_main_thread`).
        response: pb.EnqueueTasksResponse = _off_the_main_thread(
            self._stub(address).EnqueueTasks, request, timeout=timeout, metadata=self._metadata
        )
        return response

    def get_task_status(
        self, task_id: str, *, history: bool = False, payload: bool = False, explain: bool = False
    ) -> TaskStatus:
        """The task's current status, with its event history, payload and explanation if asked.

        The explanation (`explain_task`'s sentences) is read with the rest of the status, so
        the two agree even while the task moves on.
        """
        request = core.get_request(task_id, history=history, payload=payload, explain=explain)
        status = core.status_from_response(self._call("GetTask", request), self._codec)
        if explain and not status.explanation:
            # A server older than the explanation in GetTask (it is never empty when asked):
            # read it on its own, as clients did before.
            reasons = self.explain_task(task_id)
            status = dataclasses.replace(status, explanation=tuple(reasons))
        return status

    def cancel_task(self, task_id: str) -> TaskStatus:
        """Cancel a queued or running task; raises TaskAlreadyFinished if it has finished."""
        return core.status_from_response(
            self._call("CancelTask", core.cancel_request(task_id)), self._codec
        )

    def list_workers(
        self, *, include_stopped: bool = False, limit: int = DEFAULT_WORKERS_PER_PAGE
    ) -> list[WorkerInfo]:
        """Up to `limit` registered workers (stopped ones only if asked), in trouble first.

        Lost workers and those with a blocked event loop come first, then the newest.
        `list_workers_page` says how many there are in all and pages through them.
        """
        return list(self.list_workers_page(include_stopped=include_stopped, limit=limit).workers)

    def list_workers_page(
        self,
        *,
        include_stopped: bool = False,
        limit: int = DEFAULT_WORKERS_PER_PAGE,
        page_token: str | None = None,
    ) -> WorkerPage:
        """One page of registered workers, as `list_workers` orders them, with the total.

        Pass `next_page_token` back for the next page. A server caps a page at 10,000.
        """
        request = core.list_workers_request(
            include_stopped=include_stopped, limit=limit, page_token=page_token
        )
        response = self._call("ListWorkers", request, service="AdminService")
        return core.worker_page_from_response(response)

    def explain_task(self, task_id: str) -> list[str]:
        """Why the task is where it is, in plain sentences, most important first."""
        response = self._call("ExplainTask", core.explain_request(task_id), service="AdminService")
        return list(response.reasons)

    def get_status(self) -> ClusterStatus:
        """The cluster's numbers as the answering server last sampled them (see /status)."""
        response = self._call("GetStatus", pb.GetStatusRequest(), service="AdminService")
        return core.status_from_get_status(response)

    def list_tasks(
        self,
        *,
        states: StatesArg = None,
        type: str | None = None,  # noqa: A002 - the filter is the task's `type`
        limit: int = 50,
        page_token: str | None = None,
    ) -> TaskPage:
        """One page of tasks, newest first; pass `next_page_token` back for the next."""
        request = core.list_tasks_request(states, type, limit, page_token)
        return core.page_from_response(
            self._call("ListTasks", request, service="AdminService"), self._codec
        )

    def retry_tasks(
        self,
        task_ids: Sequence[str] = (),
        *,
        states: StatesArg = None,
        type: str | None = None,  # noqa: A002 - the filter is the task's `type`
        dry_run: bool = False,
        limit: int = 0,
        reason: str = "",
        as_of: str | None = None,
    ) -> BulkResult:
        """Re-queue FAILED or CANCELLED tasks as a new series of attempts.

        By ids, or by a filter (states and/or type) when no ids are given; `dry_run`
        counts what the filter matches, and passing its result's `as_of` to the action makes
        it cover only the tasks counted (not those enqueued since). A filter is worked
        through oldest first in several short calls. Recorded in each task's history with
        `reason`.
        """
        request = core.bulk_request(
            task_ids,
            states=states,
            task_type=type,
            dry_run=dry_run,
            limit=limit,
            reason=reason,
            as_of=as_of,
        )
        return self._bulk("RetryTasks", request)

    def cancel_tasks(
        self,
        task_ids: Sequence[str] = (),
        *,
        states: StatesArg = None,
        type: str | None = None,  # noqa: A002 - the filter is the task's `type`
        dry_run: bool = False,
        limit: int = 0,
        reason: str = "",
        as_of: str | None = None,
    ) -> BulkResult:
        """Cancel QUEUED or RUNNING tasks, by ids or by a filter (see `retry_tasks`)."""
        request = core.bulk_request(
            task_ids,
            states=states,
            task_type=type,
            dry_run=dry_run,
            limit=limit,
            reason=reason,
            as_of=as_of,
        )
        return self._bulk("CancelTasks", request)

    def _bulk(self, method: str, request: pb.BulkTaskRequest) -> BulkResult:
        """Run a bulk action to its end: a filter is answered in several short calls."""
        tally = core.BulkTally(request)
        follow_up: pb.BulkTaskRequest | None = request
        while follow_up is not None:
            response = self._call(method, follow_up, service="AdminService")
            follow_up = tally.next_request(response)
        return tally.result()

    def pause_type(self, task_type: str, *, reason: str = "") -> bool:
        """Stop leasing `task_type` (running tasks finish); False if already paused."""
        request = pb.PauseTypeRequest(
            type=validate_task_type(task_type), reason=core.checked_reason(reason)
        )
        response = self._call("PauseType", request, service="AdminService")
        return bool(response.changed)

    def resume_type(self, task_type: str) -> bool:
        """Lease `task_type` again; False if it was not paused."""
        request = pb.ResumeTypeRequest(type=validate_task_type(task_type))
        response = self._call("ResumeType", request, service="AdminService")
        return bool(response.changed)

    def close(self) -> None:
        """Close every channel; later calls, and retries of calls in flight, raise ConfigError.

        In a forked child it only marks this copy closed: the connections are the parent's.
        """
        if self._owner.forked:
            # Without the lock: a thread of the parent may have held it at the fork (every
            # enqueue takes it to find its stream), and no thread here will release it.
            self._closed = True
            return
        with self._channels_lock:
            self._closed = True
            channels = list(self._channels.values())
            streams = list(self._enqueue_streams.values())
            self._channels.clear()
            self._stubs.clear()
            self._enqueue_streams.clear()
        for stream in streams:
            stream.close()
        for channel in channels:
            channel.close()

    def __enter__(self) -> Self:
        """Use as a context manager; closes on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the client."""
        self.close()


def _off_the_main_thread(call: Callable[..., Response], *args: Any, **kwargs: Any) -> Response:
    """`call(*args, **kwargs)`, on a thread of its own when called on the main thread.

    Python delivers signals to the main thread, and a KeyboardInterrupt raised there inside
    grpc's blocking call can land between a lock's acquisition and the `with` that would
    release it (`threading.Condition.__enter__` is Python code): the channel's lock stayed
    held, and every later call on the client hung past its deadline (a Ctrl-C storm over
    get_task_status in a review, 3 of 3 runs). The caller waits on a SimpleQueue instead,
    whose get() an interrupt leaves clean; the call runs on to its deadline, unread. Other
    threads never take signals, and call inline.
    """
    if threading.current_thread() is not threading.main_thread():
        return call(*args, **kwargs)
    outcome: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

    def run() -> None:
        try:
            outcome.put((True, call(*args, **kwargs)))
        except BaseException as exc:  # re-raised in the caller
            outcome.put((False, exc))

    threading.Thread(target=run, name="conveyor-call", daemon=True).start()
    answered, value = outcome.get()
    if answered:
        return cast("Response", value)
    raise value


def _drop_streams(streams: dict[str, BlockingEnqueueStream]) -> None:
    for stream in list(streams.values()):
        stream.drop()
