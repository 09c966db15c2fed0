"""The client's end of one `EnqueueStream` call (see server/enqueue_stream.py).

A client sends its enqueue requests on one long-lived call per server instead of a call
each (`EnqueueStream` for `AsyncClient`, `BlockingEnqueueStream` for `Client`). That saves
a producer that enqueues one task at a time the set-up of a call per task: on the 2-core
benchmark machine, a fifth to a third of a millisecond of round trip and half the server's
CPU for the exchange. Each request is numbered and answered on its own with the status an
`EnqueueTasks` call would have ended with; `send` raises that status as a `RequestFailed`,
which `RetryLoop` treats exactly as a failed call.

When the call ends, for any reason, every unanswered request fails with `StreamEnded`
(transient, UNAVAILABLE, when the server ended it OK because it had been idle or is
stopping), and the client sends it again: at once on a new stream if the server ended one
that had been open a while (it may just have been idle), else through its retry loop. A
stream the server had accepted and that then ended with an error (gRPC's own, such as a
message over the server's size limit, or a request breaking the protocol) says nothing
about the other requests on it, which may belong to other threads or coroutines: they are
sent again at once on a new stream, once. Should that one break too, each goes as an
`EnqueueTasks` call of its own: the request that breaks every stream it goes on gets the
server's status for it alone, and the others go through. (Retried as transient, such a
request broke the stream shared by every caller until the retry budget ran out, and its
caller got ServerUnavailable in place of the real error.) A request larger than every
server accepts (`STREAM_REQUEST_BYTES`) never goes on the shared stream: it goes as an
`EnqueueTasks` call, so that a server's refusal of it reaches its caller only.
Enqueues are idempotent per task id, so a request applied twice creates its tasks once. A
request with no answer within its deadline ends the stream too, as a call's deadline ends
the call, so a server that stopped answering is not used again through a stale stream.

Nothing is written before the server has accepted the stream (its initial metadata): a
write that races the server's end of a call makes grpc report the call's status as
INTERNAL "Internal error from Core" instead of the real one (grpc/grpc#36066), which would
turn a refusal at the door (UNIMPLEMENTED, PERMISSION_DENIED, a draining server's
UNAVAILABLE) into an error no one can act on. An accepted stream can still meet that race
when the server drains; its INTERNAL is then read as what it is, a broken stream, and the
requests are sent again.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Final

import grpc

from conveyor.client.channel import MIN_CALL_TIMEOUT
from conveyor.protocol import ENQUEUE_STREAM_ACCEPTED
from conveyor.protocol.limits import MIN_SERVER_MESSAGE_BYTES
from conveyor.protocol.status import TRANSIENT_CODES, AnsweredStatus, code_from_number
from conveyor.protocol.stream_writes import write_message
from conveyor.protocol.v1 import conveyor_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Iterator

EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
METHOD: Final = "/conveyor.v1.TaskService/EnqueueStream"
# After a server refuses a stream with one of these (UNIMPLEMENTED: it predates the stream,
# has it off, or will not give the token another; PERMISSION_DENIED: the token may not
# enqueue, which a call says in its own words), enqueues to it go as calls for
# STREAM_RETRY_AFTER seconds before the stream is tried again.
AS_CALLS_AFTER: Final = frozenset(
    {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED}
)
STREAM_RETRY_AFTER: Final = 60.0
# How long closing a client waits for the server to end its streams OK after the client
# half-closes them, before it cancels them.
CLOSE_TIMEOUT: Final = 1.0
# The details grpc gives a call whose status it replaced after a write raced the end.
GRPC_WRITE_RACE: Final = "Internal error from Core"
# How an unanswered request fails when the server ended its stream OK: transient, so the
# retry loop sends it again if it is not sent again at once (EnqueueRoute).
SERVER_ENDED_CODE: Final = grpc.StatusCode.UNAVAILABLE
SERVER_ENDED: Final = "the server ended it (it was idle, or the server is stopping); retry"
# The largest request that goes on a stream: every server accepts a message this large,
# with room for the stream's own envelope (the request's number and framing). A larger one
# would end the whole call with RESOURCE_EXHAUSTED on a server with the smallest limit.
STREAM_REQUEST_BYTES: Final = MIN_SERVER_MESSAGE_BYTES - 1024


class RequestFailed(AnsweredStatus):
    """A request on the stream answered with a status other than OK, shaped like a call's."""


class StreamEnded(RequestFailed):
    """The call ended before the request was answered; `code()` says how it ended.

    `server_closed`: the server ended a stream it had accepted, because it had been idle or
    because the server drains (or a write raced that end). A request that was written just
    then is worth sending again at once on a new stream (`EnqueueRoute`).

    `broken`: a stream the server had accepted ended with an error about the call, not
    about this request (which may be another caller's); the request is sent again at once
    on a new stream, even a stream opened for it, and as a call should that one break too.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        server_closed: bool = False,
        broken: bool = False,
    ) -> None:
        """Keep the status and how the stream ended."""
        super().__init__(code, details)
        self.server_closed = server_closed
        self.broken = broken


class EnqueueRoute:
    """How one enqueue attempt reaches one server: on its stream, or as a call.

    Both clients make their attempts through this (`AsyncClient._enqueue_once` awaiting,
    `Client._enqueue_once` blocking), so the rules live once:

    - The request goes on the address's enqueue stream, unless that server lately refused
      one with UNIMPLEMENTED: it predates the stream, has it off, or this client's token
      holds as many streams there as it may (`max_enqueue_streams_per_token`). Then it goes
      as an `EnqueueTasks` call, and so do the next ones to that server for
      `STREAM_RETRY_AFTER`: it may be upgraded meanwhile in a rolling deploy, or the
      token's other streams may have ended.
    - A stream refused with PERMISSION_DENIED (the token's role may not enqueue) is
      handled the same way: the call gets the refusal the user should see, naming
      `EnqueueTasks`, the operation they asked for, not the stream the client chose to
      carry it ("EnqueueStream needs the enqueue permission ..."); and until the role
      changes, a call is the one round trip a refused enqueue needs.
    - A stream that had been open a while may have been ended by its server for being idle
      just as the request went (`enqueue_stream_idle`): that is no failure of the server,
      and must cost neither a backoff nor a mark against its circuit breaker, so the
      request goes again at once on a new stream, once. A new stream to a server that is
      draining is refused at the door, and that failure counts as any other.
    - A request over `STREAM_REQUEST_BYTES` goes as a call: a server whose message limit
      it exceeds ends the call carrying it, and the stream is every caller's.
    - A stream that broke after the server accepted it (`StreamEnded.broken`) failed the
      request for no fault of its own: it goes again at once on a new stream, once. Should
      that one break too, it goes as a call, which carries it alone: if it is the request
      that breaks the stream, the call ends with the server's status for it (for the
      retry loop to judge, as any call's, and the server answered: its breaker counts no
      failure); if not, it goes through. Failed as a transient UNAVAILABLE instead, it
      was sent again and again on new streams until the retry budget ran out, each time
      breaking the stream the other callers share and marking the server unreachable.
    - Any other end of the stream fails the attempt, for the retry loop to judge.
    """

    def __init__(
        self,
        calls_only_until: dict[str, float],
        address: str,
        now: float,
        timeout: float,
        request: pb.EnqueueTasksRequest,
    ) -> None:
        """Start an attempt at `now` (the client's clock) with `timeout` seconds for it."""
        self._calls_only_until = calls_only_until
        self._address = address
        self._now = now
        self._deadline = now + timeout
        self._sent_again = False
        self._as_call = False
        # Only a lone task can be this large: requests of several are cut (enqueue_batches)
        # and joined (request_weight) at about MAX_REQUEST_BYTES, half this. Measuring a
        # request is a full encode, paid for every attempt.
        self._too_large = len(request.tasks) == 1 and request.ByteSize() > STREAM_REQUEST_BYTES

    def on_stream(self) -> bool:
        """Whether the request goes (again) on the stream rather than as a call."""
        return (
            not self._too_large
            and not self._as_call
            and self._calls_only_until.get(self._address, 0.0) <= self._now
        )

    def send_timeout(self, now: float) -> float:
        """What is left of the attempt's time, at least `MIN_CALL_TIMEOUT`."""
        return max(self._deadline - now, MIN_CALL_TIMEOUT)

    def stream_ended(self, error: StreamEnded, stream_was_new: bool) -> None:
        """The stream failed the request: return to send it again, raise `error` if not.

        Whether it goes again on a new stream or as a call, `on_stream` says.
        """
        resend = error.broken or (error.server_closed and not stream_was_new)
        if resend and not self._sent_again:
            self._sent_again = True
            return
        if error.code() in AS_CALLS_AFTER:
            self._calls_only_until[self._address] = self._now + STREAM_RETRY_AFTER
            return
        if error.broken:
            self._as_call = True
            return
        raise error


class EnqueueStream:
    """Sends numbered EnqueueTasks requests on one call and matches their answers."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Any) -> None:
        """Open the call (lazily: nothing goes to the server before the first request)."""
        self._call: Any = channel.stream_stream(
            METHOD,
            request_serializer=pb.EnqueueStreamRequest.SerializeToString,
            response_deserializer=pb.EnqueueStreamResponse.FromString,
        )(metadata=metadata)  # type: ignore[call-arg]  # no request iterator: write as we go
        self._numbers = itertools.count(1)
        self._answers: dict[int, asyncio.Future[pb.EnqueueStreamResponse]] = {}
        self._write_lock = asyncio.Lock()
        self._accepted = False
        self._ended: StreamEnded | None = None
        self._reader = asyncio.create_task(self._read_all(), name="enqueue-stream-read")

    @property
    def ended(self) -> bool:
        """Whether the call is over (a new request needs a new stream)."""
        return self._ended is not None

    async def send(
        self, request: pb.EnqueueTasksRequest, timeout: float
    ) -> pb.EnqueueTasksResponse:
        """Send `request` and wait for its answer; raise its status if not OK.

        Raises StreamEnded if the call ended before the answer (the request may or may not
        have been applied), and RequestFailed with DEADLINE_EXCEEDED after `timeout`.
        """
        if self._ended is not None:
            raise self._ended
        number = next(self._numbers)
        answer: asyncio.Future[pb.EnqueueStreamResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self._answers[number] = answer
        try:
            async with asyncio.timeout(timeout):
                await self._write(pb.EnqueueStreamRequest(request_id=number, request=request))
                reply = await answer
        except TimeoutError:
            self._abandon()
            raise _deadline_passed(timeout) from None
        finally:
            self._answers.pop(number, None)
            # Failed by the reader while the write waited: retrieved, so never logged as lost.
            if answer.done() and not answer.cancelled():
                answer.exception()
            answer.cancel()
        return _response(reply)

    def _abandon(self) -> None:
        """A deadline passed: no request goes on this stream any more; end the call."""
        if self._ended is None:
            self._ended = _ended(grpc.StatusCode.UNAVAILABLE, "a request's deadline ended it")
        self._call.cancel()

    async def close(self) -> None:
        """Half-close, so the server ends the call OK; cancel it if that takes too long.

        Requests still unanswered fail with StreamEnded.
        """
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                async with self._write_lock:
                    if self._accepted and self._ended is None:
                        await self._call.done_writing()
                await asyncio.shield(self._reader)
        except (TimeoutError, grpc.aio.BaseError, grpc.RpcError, asyncio.InvalidStateError):
            pass  # the call is over, or will be once cancelled
        finally:
            self._call.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _write(self, request: pb.EnqueueStreamRequest) -> None:
        async with self._write_lock:
            if not self._accepted:
                # Resolves when the server accepts the stream, or (empty) with its refusal;
                # only the server's acceptance header says it is safe to write.
                metadata = await self._call.initial_metadata()
                self._accepted = _accepts(metadata)
            if not self._accepted or self._ended is not None or self._call.done():
                await self._reader_done()
                raise self._ended or _ended(grpc.StatusCode.UNAVAILABLE, "refused")
            # A write that did not go (the call cancelled locally by another request's
            # deadline, or over): the reader says how the call ended.
            failure = await write_message(self._call, request)
            if failure is not None:
                await self._reader_done()
                raise self._ended or _ended(grpc.StatusCode.UNAVAILABLE, failure)

    async def _reader_done(self) -> None:
        # asyncio.wait, not gather: a sender cancelled while it waits must not cancel the
        # reader, which every other request on the stream depends on.
        await asyncio.wait({self._reader})

    async def _read_all(self) -> None:
        ended = _ended(grpc.StatusCode.UNAVAILABLE, "the client closed it")
        try:
            # grpc.aio's read() gives EOF only for a call that ended OK, and raises the
            # status of one that did not.
            while (reply := await self._call.read()) is not EOF:
                answer = self._answers.get(reply.request_id)
                if answer is not None and not answer.done():
                    answer.set_result(reply)
            ended = _ended(SERVER_ENDED_CODE, SERVER_ENDED, server_closed=True)
        except grpc.aio.AioRpcError as exc:
            ended = _ended_by(exc.code(), exc.details() or "", accepted=self._accepted)
        except asyncio.CancelledError:
            pass  # closed, or the call cancelled after a deadline
        finally:
            # A deadline that abandoned the stream said first how it ended.
            self._ended = self._ended or ended
            for answer in self._answers.values():
                if not answer.done():
                    answer.set_exception(self._ended)


class BlockingEnqueueStream:
    """`EnqueueStream` for threads: the same protocol over a blocking gRPC channel.

    gRPC's blocking API takes a request iterator and gives a response iterator: requests
    go through a queue that gRPC's own thread drains, and a reader thread matches each
    answer to the thread waiting for it. Safe to share between threads.
    """

    def __init__(self, channel: grpc.Channel, metadata: Any) -> None:
        """Open the call; a daemon thread reads its answers until it ends."""
        self._outgoing: queue.SimpleQueue[pb.EnqueueStreamRequest | None] = queue.SimpleQueue()
        self._call: Any = channel.stream_stream(
            METHOD,
            request_serializer=pb.EnqueueStreamRequest.SerializeToString,
            response_deserializer=pb.EnqueueStreamResponse.FromString,
        )(self._requests(), metadata=metadata)
        self._numbers = itertools.count(1)
        self._answers: dict[int, Future[pb.EnqueueStreamResponse]] = {}
        self._lock = threading.Lock()
        # Set once the server has accepted the stream, or the call has ended.
        self._accepted = threading.Event()
        self._ended: StreamEnded | None = None
        # A forked child inherits the stream but not its threads: there it is over.
        self._pid = os.getpid()
        self._reader = threading.Thread(
            target=self._read_all, name="conveyor-enqueue-stream", daemon=True
        )
        self._reader.start()

    @property
    def ended(self) -> bool:
        """Whether the call is over (a new request needs a new stream)."""
        return self._ended is not None or os.getpid() != self._pid

    def send(self, request: pb.EnqueueTasksRequest, timeout: float) -> pb.EnqueueTasksResponse:
        """Send `request` and wait for its answer (see `EnqueueStream.send`)."""
        answer: Future[pb.EnqueueStreamResponse] = Future()
        started = time.monotonic()
        if not self._accepted.wait(timeout):
            self._abandon()
            raise RequestFailed(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the server did not accept the enqueue stream in {timeout:g}s",
            )
        with self._lock:
            if self._ended is not None:
                raise self._ended
            number = next(self._numbers)
            self._answers[number] = answer
        try:
            self._outgoing.put(pb.EnqueueStreamRequest(request_id=number, request=request))
            reply = answer.result(max(0.0, timeout - (time.monotonic() - started)))
        except FutureTimeout:
            self._abandon()
            raise _deadline_passed(timeout) from None
        finally:
            with self._lock:
                self._answers.pop(number, None)
        return _response(reply)

    def _abandon(self) -> None:
        """A deadline passed: no request goes on this stream any more; end the call."""
        with self._lock:
            if self._ended is None:
                self._ended = _ended(grpc.StatusCode.UNAVAILABLE, "a request's deadline ended it")
        self._call.cancel()

    def close(self) -> None:
        """Half-close, so the server ends the call OK; cancel it if that takes too long.

        Requests still unanswered fail with StreamEnded. Nothing, in a forked child (see
        `drop`).
        """
        if os.getpid() != self._pid:
            return
        self._outgoing.put(None)
        self._reader.join(timeout=CLOSE_TIMEOUT)
        self.drop()
        self._reader.join(timeout=CLOSE_TIMEOUT)

    def drop(self) -> None:
        """End the call without waiting for anything (a client forgotten unclosed).

        In a forked child it does nothing: the call belongs to the parent's gRPC core,
        whose threads the child lacks, and cancelling it there could hang the child's
        exit (the client's finalizer runs at interpreter shutdown): about one exit in forty
        here, and every one whose fork came while a thread of the parent held the call.
        """
        if os.getpid() != self._pid:
            return
        self._outgoing.put(None)
        self._call.cancel()

    def _requests(self) -> Iterator[pb.EnqueueStreamRequest]:
        while (request := self._outgoing.get()) is not None:
            yield request

    def _read_all(self) -> None:
        ended = _ended(SERVER_ENDED_CODE, SERVER_ENDED, server_closed=True)
        try:
            # The server accepted the stream (its header), or refused it: then the loop
            # below raises the refusal, and `send` hears it once `_ended` is set.
            if _accepts(self._call.initial_metadata()):
                self._accepted.set()
            for reply in self._call:
                with self._lock:
                    answer = self._answers.get(reply.request_id)
                if answer is not None and not answer.done():
                    answer.set_result(reply)
        except grpc.RpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.CANCELLED:
                ended = _ended(grpc.StatusCode.UNAVAILABLE, "the client closed it")
            else:
                ended = _ended_by(code, exc.details() or "", accepted=self._accepted.is_set())
        finally:
            with self._lock:
                self._ended = self._ended or ended
                waiting = list(self._answers.values())
            self._accepted.set()
            # Stop gRPC's thread waiting on the queue for requests that will never go.
            self._outgoing.put(None)
            for answer in waiting:
                if not answer.done():
                    answer.set_exception(self._ended)


def _response(reply: pb.EnqueueStreamResponse) -> pb.EnqueueTasksResponse:
    """The answer's response, or its status raised as RequestFailed."""
    if reply.code:
        raise RequestFailed(code_from_number(reply.code), reply.message, reply.field)
    return reply.response


def _ended_by(code: grpc.StatusCode, details: str, *, accepted: bool) -> StreamEnded:
    """How a call that ended with this status fails its unanswered requests.

    A stream refused at the door (not `accepted`) fails them with the refusal: it concerns
    every request this client sends there (its token, its role, a draining server).
    """
    if accepted and code not in TRANSIENT_CODES and details != GRPC_WRITE_RACE:
        # The server read some message it could not take (gRPC's size limit, a request
        # breaking the protocol) and ended the call: the requests left unanswered are not
        # to blame, and may be other callers'. Enqueues are idempotent per id: resend.
        return _ended(
            grpc.StatusCode.UNAVAILABLE,
            f"the call broke ({code.name}: {details}); the request is sent again",
            broken=True,
        )
    if code is grpc.StatusCode.INTERNAL and details == GRPC_WRITE_RACE:
        # A write raced the server's end of the call (grpc/grpc#36066, see the module's
        # docstring): the stream broke; what it carried is sent again. An INTERNAL the
        # server itself sent carries its own message, and is not retried, as for a call.
        return _ended(
            grpc.StatusCode.UNAVAILABLE, f"the call broke ({details})", server_closed=True
        )
    return StreamEnded(code, details)


def _deadline_passed(timeout: float) -> RequestFailed:
    return RequestFailed(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer on the enqueue stream in {timeout:g}s"
    )


def _accepts(metadata: Any) -> bool:
    """Whether a stream's initial metadata is the server's acceptance."""
    return any(key == ENQUEUE_STREAM_ACCEPTED for key, _ in metadata or ())


def _ended(
    code: grpc.StatusCode, how: str, *, server_closed: bool = False, broken: bool = False
) -> StreamEnded:
    return StreamEnded(
        code,
        f"the enqueue stream ended before the answer: {how}",
        server_closed=server_closed,
        broken=broken,
    )
