"""WorkStream: the worker's end of one `Work` call (see server/work_stream.py).

The stream carries what the lease long poll and the report calls carried, as messages:
grants of room for leases out, leases in, batches of outcomes out, their answers in. This
class keeps the stream's books: how much room granted here is still unfilled (`unfilled`,
which the runtime counts as taken, so a worker never holds more leases than it has room
for), and which outcome batches await their answer. When the call ends, for any reason,
every unanswered batch fails as unreachable, and the runtime retries each report on its own
path, as after a failed `ReportResults` call. The runtime may also give up on a call that
stopped answering (`abandon`): a connection that died silently looks open until keepalive
says otherwise, and what waits on it must not wait that long. `last_received` tells
whether the call is still heard from: a stream that carried a message since a heartbeat to
its server failed is alive, whatever became of that heartbeat.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING, Any

import grpc

from conveyor.protocol.stream_writes import write_message
from conveyor.protocol.v1 import conveyor_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


class StreamEnded(Exception):
    """The call ended before a batch of outcomes on it was answered."""


class WorkStream:
    """Writes grants and outcome batches; reads leases and answers (`read_all`)."""

    def __init__(self, call: Any, on_leases: Callable[[Sequence[pb.Lease]], None]) -> None:
        """`call` is an open `Work` stream-stream call; `on_leases` gets each lease message."""
        self._call = call
        self._on_leases = on_leases
        self._numbers = itertools.count(1)
        self._answers: dict[int, asyncio.Future[pb.ReportResultsResponse]] = {}
        self._write_lock = asyncio.Lock()
        # Room granted on this stream that no lease has filled yet.
        self.unfilled = 0
        # False once the worker has half-closed (it is leaving) or the call has ended.
        self.writable = True
        # Why the worker gave up on the call (`abandon`), or None.
        self.abandoned: str | None = None
        # When the last message from the server arrived (the loop's clock; -inf: none yet).
        self.last_received = float("-inf")

    async def open(self, worker_id: str, task_types: Sequence[str], grant: int) -> None:
        """Send the first message; wait for the server's empty one saying it accepted."""
        self.unfilled += grant
        first = pb.WorkRequest(worker_id=worker_id, task_types=task_types, grant=grant)
        try:
            await self._write(first)
        except StreamEnded:
            await self._call.read()  # raises the status the call ended with, if any
            raise
        accepted = await self._call.read()
        if accepted is EOF:
            raise StreamEnded("the server ended the Work stream at once")
        self._take(accepted)

    async def grant(self, room: int) -> None:
        """Add room for `room` more leases."""
        self.unfilled += room
        await self._write(pb.WorkRequest(grant=room))

    async def report(
        self, request: pb.ReportResultsRequest, grant: int
    ) -> pb.ReportResultsResponse:
        """Deliver a batch of outcomes (with any room freed meanwhile); their answers.

        Raises StreamEnded if the call ends before they are answered: they may or may not
        have been applied, and fencing makes a retry of an applied one a harmless refusal.
        """
        number = next(self._numbers)
        answer: asyncio.Future[pb.ReportResultsResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self._answers[number] = answer
        self.unfilled += grant
        try:
            await self._write(
                pb.WorkRequest(reports=request.reports, reports_id=number, grant=grant)
            )
            return await answer
        finally:
            self._answers.pop(number, None)
            # Failed by `close` while the write waited: retrieved, so never logged as lost.
            if answer.done() and not answer.cancelled():
                answer.exception()
            answer.cancel()

    async def leave(self) -> None:
        """Half-close: the server leases no more, answers what it got, and ends the call."""
        async with self._write_lock:
            if self.writable:
                self.writable = False
                await self._call.done_writing()

    async def read_all(self) -> None:
        """Read until the call ends: OK returns; an error status raises AioRpcError.

        Raises StreamEnded once the call was abandoned.
        """
        try:
            # grpc.aio's read() gives EOF only for a call that ended OK, and raises the
            # status of one that did not.
            while (response := await self._call.read()) is not EOF:
                self._take(response)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            # A call cancelled here (`abandon`) ends its read with a CancelledError, which is
            # not this task being cancelled, or with CANCELLED: both are the abandonment.
            task = asyncio.current_task()
            if self.abandoned is None or (task is not None and task.cancelling()):
                raise
            raise StreamEnded(f"the Work stream was abandoned: {self.abandoned}") from None
        finally:
            self.close()

    def abandon(self, why: str) -> None:
        """Give up on the call (it stopped answering): fail its batches, cancel it.

        `read_all` then raises StreamEnded, and the runtime opens another stream.
        """
        if self.abandoned is None:
            self.abandoned = why
        self.close(f"the Work stream was abandoned before the answer: {why}")
        self._call.cancel()

    def close(self, why: str = "the Work stream ended before the answer") -> None:
        """The call is over: fail every unanswered batch, refuse new writes."""
        self.writable = False
        self.unfilled = 0
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(StreamEnded(why))
        self._answers.clear()

    def _take(self, response: pb.WorkResponse) -> None:
        self.last_received = asyncio.get_running_loop().time()
        if response.leases:
            # A server never sends more than was granted; never count below zero if one did.
            self.unfilled = max(0, self.unfilled - len(response.leases))
            self._on_leases(response.leases)
        if response.reports_id:
            answer = self._answers.get(response.reports_id)
            if answer is not None and not answer.done():
                answer.set_result(pb.ReportResultsResponse(outcomes=response.outcomes))

    async def _write(self, request: pb.WorkRequest) -> None:
        async with self._write_lock:
            if not self.writable:
                raise StreamEnded("the Work stream is closed for writing")
            # A write that did not go: the call was cancelled locally (the worker replacing
            # or leaving the stream), or is over (`read_all` reports how it ended).
            failure = await write_message(self._call, request)
            if failure is not None:
                self.writable = False
                raise StreamEnded(f"the Work stream was {failure}")
