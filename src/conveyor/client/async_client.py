"""AsyncClient: the asyncio twin of `Client`, with the same method names as coroutines."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar

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
    EnqueueRoute,
    EnqueueStream,
    StreamEnded,
)
from conveyor.codec import PayloadCodec, chosen_codec
from conveyor.errors import ConfigError, ConveyorError, ServerUnavailable
from conveyor.group_commit import GroupCommit
from conveyor.protocol.limits import DEFAULT_WORKERS_PER_PAGE
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.types import validate_task_type

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Sequence
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

CLOSED_DURING_CALL: Final = "the client was closed during the call"
ANOTHER_LOOP: Final = (
    "this AsyncClient belongs to another event loop, which is still open: its connections "
    "(grpc.aio channels) work only on the loop they were opened on. Use one AsyncClient per "
    "event loop, or close() it on its loop before using it on another"
)


class AsyncClient:
    """Enqueue tasks, read their status, cancel them, from asyncio code.

    Takes the same arguments as `Client` and behaves the same way; use it with
    `async with AsyncClient(...) as client:` or call `await client.close()`.

    Its connections (grpc.aio channels) belong to the event loop they were opened on, the
    loop of the client's first call. Once that loop has closed (one `asyncio.run()` after
    another, a test framework's loop per test), the next call on another loop drops them
    and opens new ones. While it is open, a call from another loop raises ConfigError:
    share a client between the coroutines of one loop, not between loops (close it on its
    loop first to move it to another).

    Unlike `Client`, a closed AsyncClient opens new connections on its next call: closing
    it on its loop is how it moves to another loop (see above). Calls in flight when it
    closes finish, or raise ServerUnavailable ("the client was closed during the call")
    without retrying: only a call made after close() opens connections again.

    As a `Client` does, it belongs to the process that created it: in a forked child (a
    prefork web server's worker that inherits a client made at import) every call raises
    ConfigError at once, whatever its event loop, and `close()` only marks the child's copy
    closed. Create one in the child; it works only if the parent held no connections
    when it forked (otherwise ConfigError: gRPC cannot connect from such a child).
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
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, str], Any] = {}
        # Enqueues go on one stream per server (see enqueue_stream.py), or as calls, until
        # the time noted here, to a server that does not serve the stream.
        self._enqueue_streams: dict[str, EnqueueStream] = {}
        self._calls_only_until: dict[str, float] = {}
        self._enqueues = self._group_commit()
        # How many times close() ran: a call that was in flight then ends instead of
        # opening the connections again for its retry.
        self._closes = 0
        # The loop the channels, streams and waiting enqueues above belong to (None before
        # the first call and after close()); the lock makes a move to another loop whole.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        # Set once a loop closed under the client (one asyncio.run() per job): enqueues then
        # go as calls. A stream's pending read, cut off by the loop's end, kept that loop
        # alive in grpc's completion queue for good (a closed loop and ~4 KB per run, and
        # "Event loop is closed" tracebacks); a call leaves nothing behind.
        self._outlived_a_loop = False
        self._owner = core.OwningProcess("an AsyncClient")
        adoptable_after_fork(self)

    def _adopt_if_unused(self) -> None:
        """Internal (channel.Adoptable): a forked child takes over a client never used."""
        if self._owner.called or self._closes:
            return
        self._loop_lock = threading.Lock()
        self._enqueues = self._group_commit()
        self._owner.adopt()

    def _group_commit(self) -> GroupCommit[pb.EnqueueTasksRequest, str]:
        # Enqueues from concurrent coroutines that wait while others are in flight go
        # together in one request: a web app's handlers each enqueue one task, and a
        # round trip per task would cap them at a few hundred a second.
        return GroupCommit(
            self._send_enqueue,
            stopped=lambda: ServerUnavailable("the client was closed"),
            **core.ENQUEUE_JOINING,
        )

    def _on_running_loop(self) -> None:
        """Tie the connections to the running loop, or ConfigError if another one has them.

        A closed loop's channels and streams can never be used or closed again (each would
        raise RuntimeError: Event loop is closed): they are dropped, unawaited, and grpc
        releases each channel when it is collected. In a forked child, ConfigError at once:
        the parent's loop looks open there (a call blamed "another event loop"), and
        connections opened there never answer (a call waited out its retry budget).
        """
        self._owner.check()
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        with self._loop_lock:
            if self._loop is not None and self._loop is not loop:
                if not self._loop.is_closed():
                    raise ConfigError(ANOTHER_LOOP)
                self._drop_connections()
                self._outlived_a_loop = True
            self._loop = loop

    def _drop_connections(self) -> None:
        """Forget every channel, stream and waiting enqueue (their loop is closed)."""
        self._channels.clear()
        self._stubs.clear()
        self._enqueue_streams.clear()
        # Times of the old loop's clock, which the next loop's need not share.
        self._calls_only_until.clear()
        self._enqueues = self._group_commit()

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            # Ties the client to this loop again: a call that began while close() ran may
            # open a channel after close() let go of the loop, and a call from another loop
            # then took that channel for its own.
            self._on_running_loop()
            channel = self._credentials.open_channel(address, aio=True)
            self._channels[address] = channel
        return channel

    def _stub(self, address: str, service: str = "TaskService") -> Any:
        # One stub per channel and service: a stub builds a callable per method, which
        # cost more than the rest of a single enqueue's client-side work when made per call.
        stub = self._stubs.get((address, service))
        if stub is not None:
            return stub
        stub = self._stubs[(address, service)] = getattr(pb_grpc, f"{service}Stub")(
            self._channel(address)
        )
        return stub

    async def _call(self, method: str, request: Any, service: str = "TaskService") -> Any:
        return await self._retrying(
            method,
            lambda address, timeout: getattr(self._stub(address, service), method)(
                request, timeout=timeout, metadata=self._metadata
            ),
        )

    async def _retrying(
        self, method: str, attempt: Callable[[str, float], Awaitable[Response]]
    ) -> Response:
        """`attempt(address, timeout)` until it answers, as `RetryLoop` decides."""
        self._on_running_loop()
        closes = self._closes
        attempts = RetryLoop(
            self._ring,
            self._retry,
            method,
            clock=asyncio.get_running_loop().time,
            token_sent=self._metadata is not None,
            tls=self._credentials.tls is not None,
        )
        while True:
            # A call that was waiting (a backoff, a breaker's probe) when close() ran ends
            # here: its next attempt would open a channel, and for an enqueue a stream with
            # its reader task, that nothing closes any more.
            self._check_open(closes)
            pick, pause = attempts.step()
            if pick is None:
                await asyncio.sleep(pause)
                continue
            try:
                response = await attempt(pick.address, attempts.call_timeout())
            except grpc.RpcError as exc:  # a failed call, or a request failed on a stream
                if self._closes != closes:
                    # close() ended it: no retry reopens what close() closed.
                    attempts.abandoned(pick)
                    raise ServerUnavailable(CLOSED_DURING_CALL) from None
                attempts.failed(pick, exc)
                continue
            except asyncio.CancelledError:
                attempts.abandoned(pick)
                current = asyncio.current_task()
                if self._closes != closes and current is not None and not current.cancelling():
                    # close() cancelled the call (a channel closed without grace cancels
                    # its calls, and grpc.aio raises CancelledError in their callers), not
                    # anyone's cancel of this task: a web framework's request handler would
                    # otherwise be taken for cancelled, its TaskGroup torn down.
                    raise ServerUnavailable(CLOSED_DURING_CALL) from None
                raise
            except BaseException:
                # The breaker must not wait for ever for this call's verdict if it was a
                # probe.
                attempts.abandoned(pick)
                raise
            attempts.succeeded(pick)
            return response

    def _check_open(self, closes: int) -> None:
        """Raise ServerUnavailable if close() ran since the call began (`closes` then)."""
        if self._closes != closes:
            raise ServerUnavailable(CLOSED_DURING_CALL)

    async def enqueue_task(self, task: Task) -> str:
        """Enqueue one task; return its id."""
        return (await self.enqueue_tasks([task]))[0]

    async def enqueue_tasks(self, tasks: Iterable[Task]) -> list[str]:
        """Enqueue many tasks in as few round trips as possible; return their ids in order.

        As `Client.enqueue_tasks`: requests of up to 1,000 tasks each commit on their own,
        and an error carries the ids committed before it (`committed_ids`).
        """
        self._on_running_loop()
        tasks = core.task_list(tasks)
        ids: list[str] = []
        types = (getattr(task, "type", "?") for task in tasks)
        with tracing.enqueue_span(types, len(tasks)) as trace_context:
            for request in core.enqueue_batches(tasks, trace_context, self._codec):
                try:
                    ids.extend(await self._enqueues.submit(request))
                except ConveyorError as exc:
                    core.failed_part(exc, len(ids), ids)
                    raise
        return ids

    async def _send_enqueue(self, request: pb.EnqueueTasksRequest) -> Sequence[str]:
        closes = self._closes
        response = await self._retrying(
            "EnqueueTasks",
            lambda address, timeout: self._enqueue_once(address, request, timeout, closes),
        )
        return response.task_ids

    async def _enqueue_once(
        self, address: str, request: pb.EnqueueTasksRequest, timeout: float, closes: int
    ) -> pb.EnqueueTasksResponse:
        """One attempt: on the address's enqueue stream, or as a call (see EnqueueRoute).

        `closes` is the client's count of close() when the enqueue began: a stream that
        ends after that (close() ends them all) is not opened again.
        """
        loop = asyncio.get_running_loop()
        route = EnqueueRoute(self._calls_only_until, address, loop.time(), timeout, request)
        while not self._outlived_a_loop and route.on_stream():
            self._check_open(closes)
            stream = self._enqueue_streams.get(address)
            stream_was_new = stream is None or stream.ended
            if stream is None or stream.ended:
                stream = EnqueueStream(self._channel(address), self._metadata)
                self._enqueue_streams[address] = stream
            try:
                return await stream.send(request, route.send_timeout(loop.time()))
            except StreamEnded as exc:
                route.stream_ended(exc, stream_was_new)
        self._check_open(closes)
        response: pb.EnqueueTasksResponse = await self._stub(address).EnqueueTasks(
            request, timeout=timeout, metadata=self._metadata
        )
        return response

    async def get_task_status(
        self, task_id: str, *, history: bool = False, payload: bool = False, explain: bool = False
    ) -> TaskStatus:
        """The task's current status, with its event history, payload and explanation if asked.

        The explanation (`explain_task`'s sentences) is read with the rest of the status, so
        the two agree even while the task moves on.
        """
        request = core.get_request(task_id, history=history, payload=payload, explain=explain)
        status = core.status_from_response(await self._call("GetTask", request), self._codec)
        if explain and not status.explanation:
            # A server older than the explanation in GetTask (it is never empty when asked):
            # read it on its own, as clients did before.
            reasons = await self.explain_task(task_id)
            status = dataclasses.replace(status, explanation=tuple(reasons))
        return status

    async def cancel_task(self, task_id: str) -> TaskStatus:
        """Cancel a queued or running task; raises TaskAlreadyFinished if it has finished."""
        request = core.cancel_request(task_id)
        return core.status_from_response(await self._call("CancelTask", request), self._codec)

    async def list_workers(
        self, *, include_stopped: bool = False, limit: int = DEFAULT_WORKERS_PER_PAGE
    ) -> list[WorkerInfo]:
        """Up to `limit` registered workers (stopped ones only if asked), in trouble first.

        Lost workers and those with a blocked event loop come first, then the newest.
        `list_workers_page` says how many there are in all and pages through them.
        """
        page = await self.list_workers_page(include_stopped=include_stopped, limit=limit)
        return list(page.workers)

    async def list_workers_page(
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
        response = await self._call("ListWorkers", request, service="AdminService")
        return core.worker_page_from_response(response)

    async def explain_task(self, task_id: str) -> list[str]:
        """Why the task is where it is, in plain sentences, most important first."""
        request = core.explain_request(task_id)
        response = await self._call("ExplainTask", request, service="AdminService")
        return list(response.reasons)

    async def get_status(self) -> ClusterStatus:
        """The cluster's numbers as the answering server last sampled them (see /status)."""
        response = await self._call("GetStatus", pb.GetStatusRequest(), service="AdminService")
        return core.status_from_get_status(response)

    async def list_tasks(
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
            await self._call("ListTasks", request, service="AdminService"), self._codec
        )

    async def retry_tasks(
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
        return await self._bulk("RetryTasks", request)

    async def cancel_tasks(
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
        return await self._bulk("CancelTasks", request)

    async def _bulk(self, method: str, request: pb.BulkTaskRequest) -> BulkResult:
        """Run a bulk action to its end: a filter is answered in several short calls."""
        tally = core.BulkTally(request)
        follow_up: pb.BulkTaskRequest | None = request
        while follow_up is not None:
            response = await self._call(method, follow_up, service="AdminService")
            follow_up = tally.next_request(response)
        return tally.result()

    async def pause_type(self, task_type: str, *, reason: str = "") -> bool:
        """Stop leasing `task_type` (running tasks finish); False if already paused."""
        request = pb.PauseTypeRequest(
            type=validate_task_type(task_type), reason=core.checked_reason(reason)
        )
        response = await self._call("PauseType", request, service="AdminService")
        return bool(response.changed)

    async def resume_type(self, task_type: str) -> bool:
        """Lease `task_type` again; False if it was not paused."""
        request = pb.ResumeTypeRequest(type=validate_task_type(task_type))
        response = await self._call("ResumeType", request, service="AdminService")
        return bool(response.changed)

    async def close(self) -> None:
        """Close every channel; enqueues still waiting fail with ServerUnavailable.

        On a loop other than the client's: if the client's loop has closed, its
        connections are dropped (they cannot be closed any more, and grpc releases them),
        never an error; if it is still open, ConfigError, as for any call. In a forked
        child it only marks this copy closed: the connections are the parent's.
        """
        if self._owner.forked:
            self._closes += 1
            return
        loop = asyncio.get_running_loop()
        with self._loop_lock:
            owner = self._loop
            if owner is not None and owner is not loop:
                if not owner.is_closed():
                    raise ConfigError(ANOTHER_LOOP)
                self._drop_connections()
                self._loop = None
                return
        self._closes += 1
        await self._enqueues.close()
        # Taken out before the first wait: a call made meanwhile (after close() began, so
        # it goes on) opens connections of its own, and iterating over the dicts it grows
        # raised "dictionary changed size during iteration".
        streams = list(self._enqueue_streams.values())
        channels = list(self._channels.values())
        self._enqueue_streams.clear()
        self._channels.clear()
        self._stubs.clear()
        for stream in streams:
            await stream.close()
        for channel in channels:
            await channel.close(grace=None)
        if not self._channels:
            # Closed on its loop: the next call may come from any loop. Not while a call
            # made meanwhile holds connections on this one: the next close() closes them.
            self._loop = None

    async def __aenter__(self) -> Self:
        """Use as an async context manager; closes on exit."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the client."""
        await self.close()
