"""EnqueueStream: one client's enqueues on one long-lived call, each answered on its own.

A producer that enqueues one task at a time paid a unary call per task: on this 2-core
machine that is 0.7-1.0 ms of the server's CPU and 1.2-1.7 ms of round trip before any
work, where a message each way on an open stream costs 0.3 ms of CPU and 0.5-0.8 ms
(docs/performance.md, "Calls and messages"). Here each message carries one EnqueueTasks
request, numbered by the client, and is applied exactly as the unary call applies it:
admitted by the gate (token, role, rate limit: so a revoked token or an empty bucket
refuses the next request, not the next stream), validated, committed through the group
commit, timed and counted as an `EnqueueTasks` call. Its answer carries its number and
the status the call would have ended with; a refused request does not end the stream,
unless it was refused UNAUTHENTICATED: a token no longer valid gets its answer, and then
the stream ends OK, so that it cannot hold a call slot with requests that are all refused.

Requests are applied concurrently, as concurrent calls would be, up to
`MAX_UNANSWERED`; beyond that the stream stops reading, and HTTP/2 flow control holds the
client back. The stream ends OK when the client half-closes or the server drains, after
answering every request it has read, and the server ends an idle one (no request read and
none unanswered for `enqueue_stream_idle`, a minute by default) the same way: an open
client holds a call, and a fleet of clients that enqueue now and then, or were dropped
without being closed, must not keep thousands of them open under `--max-concurrent-rpcs`.
A client opens a new stream with its next enqueue. Requests the server never read, and
answers lost with a broken call, are the client's to send again: enqueues are idempotent
per task id, so a request applied twice creates its tasks once.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Final

import grpc

from conveyor.errors import InvalidTask
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.server.rpc import EOF, Malformed, Refusal, attempt

if TYPE_CHECKING:
    from conveyor.server.task_service import TaskService

# Requests applied at once for one stream. A client sends a request when the one before
# is in flight and no more (client/enqueue_stream.py), so two is the norm; this bounds a
# misbehaving one without refusing it.
MAX_UNANSWERED: Final = 64


class EnqueueStream:
    """Serves one `EnqueueStream` call until the client leaves, the server drains, or it idles."""

    def __init__(self, service: TaskService, context: Any, idle_after: float) -> None:
        """Bind the stream to its call (already admitted by the caller).

        `idle_after`: seconds with no request read and none unanswered after which the
        stream ends OK.
        """
        self._service = service
        self._context = context
        self._idle_after = idle_after
        self._last_active = asyncio.get_running_loop().time()
        self._write_lock = asyncio.Lock()
        self._room = asyncio.Semaphore(MAX_UNANSWERED)
        self._applying: set[asyncio.Task[None]] = set()
        # Numbers of the requests read and not yet answered: a client may reuse a number
        # once its answer is on its way, so one is freed before its answer is written.
        self._in_use: set[int] = set()
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        """The server drains: read no more, answer what was read, end the call."""
        self._stopped.set()

    async def serve(self) -> None:
        """Run the stream; return when it should end OK, raise to end it with a status."""
        reading = asyncio.create_task(self._read_loop(), name="enqueue-stream-read")
        stopping = asyncio.create_task(self._stopped.wait(), name="enqueue-stream-stop")
        idling = asyncio.create_task(self._idle_watch(), name="enqueue-stream-idle")
        tasks: tuple[asyncio.Task[Any], ...] = (reading, stopping, idling)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # The call itself ended (the client went away): no one is left to answer.
            for applying in self._applying:
                applying.cancel()
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Answer everything read, then end with the reader's error if it had one (a
        # request that breaks the protocol), or OK.
        if self._applying:
            await asyncio.gather(*self._applying, return_exceptions=True)
        error = None if reading.cancelled() else reading.exception()
        if error is not None:
            raise error

    async def _idle_watch(self) -> None:
        """Return once the stream has been idle for `idle_after` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            # Requests being applied are activity; the clock restarts at their answers.
            idle_for = 0.0 if self._in_use else loop.time() - self._last_active
            if idle_for >= self._idle_after:
                return
            await asyncio.sleep(self._idle_after - idle_for)

    async def _read_loop(self) -> None:
        while True:
            await self._room.acquire()
            request = await self._context.read()
            if request is EOF:
                return
            if isinstance(request, Malformed):
                raise InvalidTask(f"malformed EnqueueStream request: {request.reason}")
            self._last_active = asyncio.get_running_loop().time()
            self._take(request)

    def _take(self, request: pb.EnqueueStreamRequest) -> None:
        request_id = request.request_id
        if not request_id:
            raise InvalidTask("an EnqueueStream request needs a request_id other than 0")
        if request_id in self._in_use:
            raise InvalidTask(f"request_id {request_id} is already in use on this stream")
        self._in_use.add(request_id)
        task = asyncio.create_task(self._apply(request_id, request.request))
        self._applying.add(task)
        task.add_done_callback(self._applied)

    def _applied(self, task: asyncio.Task[None]) -> None:
        self._applying.discard(task)
        self._room.release()

    async def _apply(self, request_id: int, request: pb.EnqueueTasksRequest) -> None:
        service = self._service
        outcome = await attempt(
            service, "EnqueueTasks", request, self._context, lambda: service.enqueue(request)
        )
        if isinstance(outcome, Refusal):
            reply = pb.EnqueueStreamResponse(
                request_id=request_id,
                code=outcome.code.value[0],
                message=outcome.message,
                field=outcome.field or "",
            )
            if outcome.code == grpc.StatusCode.UNAUTHENTICATED:
                # The token is no longer valid (revoked, expired): answer, then end the
                # stream OK. Kept open, each refused request restarted its idle clock, and
                # a revoked token held its streams' call slots for as long as it liked.
                self._stopped.set()
        else:
            reply = pb.EnqueueStreamResponse(request_id=request_id, response=outcome)
        self._in_use.discard(request_id)
        self._last_active = asyncio.get_running_loop().time()
        # The call may be over (the client went away); the enqueue stands either way, and
        # the client's retry of it finds its tasks already there.
        with contextlib.suppress(Exception):
            async with self._write_lock:
                await self._context.write(reply)
