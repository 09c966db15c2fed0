"""ReportBatcher: a worker's outcome reports, sent together when they finish together.

Each attempt's outcome is one report. Sent one call each, reports cost a worker a quarter
of its time in gRPC call overhead at high throughput (profiled under the benchmark's
drain). Here a report goes out at once when no report call is in flight; reports made while
one is in flight wait for it and go together in the next `ReportResults` call (at most
`MAX_BATCH` reports and, by estimate, `MAX_BATCH_BYTES`; a larger report goes alone). A
lone report is a batch of one too, so that the runtime can carry every batch on its Work
stream when one is open (`call` decides the path).

A batch the server still finds over its message limit (gRPC's RESOURCE_EXHAUSTED "message
larger than max") is split in two and each half sent again, down to lone reports, whose
refusal the runtime turns into a failed attempt (a result that large can never be stored).

Each report still gets its own answer: applied, or refused with the status
`ReportResult` would have given it alone, raised as `Refused`. A failure of the whole call
(no server answered) is raised to every report in it, and each retries on its own.

A server too old to know `ReportResults` answers UNIMPLEMENTED: the batcher then sends one
`ReportResult` per report from there on, so workers can be upgraded before servers.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

import grpc

from conveyor.protocol.limits import MIN_SERVER_MESSAGE_BYTES
from conveyor.protocol.status import AnsweredStatus, code_from_number, is_too_large
from conveyor.protocol.v1 import conveyor_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

MAX_BATCH: Final = 256
# A batch's bytes by `report_bytes`: half the smallest message limit a server has. The
# worker does not know its server's limit, only that it is at least 16 MiB (more with a
# larger payload limit); half leaves room for whatever the estimate misses, as the clients
# cut enqueue requests at 8 MiB. Thirty results of 1 MB finishing together used to go as one
# message of 30 MB, refused whole. A report larger than this goes alone: a result within
# the server's payload limit fits its messages (sized for a payload and a result together),
# and a larger one is refused whoever sends it.
MAX_BATCH_BYTES: Final = MIN_SERVER_MESSAGE_BYTES // 2
# A report's bytes besides its result and error: two ids, the worker's id (up to 200
# characters), the outcome, the flags and the framing of each field, rounded up.
REPORT_FRAMING_BYTES: Final = 1024
# At most the UTF-8 bytes of one character: an error is counted without encoding it.
_UTF8_MAX: Final = 4


def report_bytes(report: pb.ReportResultRequest) -> int:
    """At least the bytes `report` takes in a message, without encoding it."""
    return len(report.result) + _UTF8_MAX * len(report.error) + REPORT_FRAMING_BYTES


def too_large_to_share(reports: Sequence[pb.ReportResultRequest]) -> bool:
    """Whether `reports` is a lone report too large to share a message (see MAX_BATCH_BYTES)."""
    return len(reports) == 1 and report_bytes(reports[0]) > MAX_BATCH_BYTES


class Refused(AnsweredStatus):
    """The server answered this report with an error status (like grpc.aio.AioRpcError)."""


class ReportBatcher:
    """Sends reports through `call(method, request)`, together when they queue up."""

    def __init__(self, worker_id: str, call: Callable[[str, Any], Awaitable[Any]]) -> None:
        """`call` raises for a call that failed as a whole (no server answered)."""
        self._worker_id = worker_id
        self._call = call
        # Each waiting report with its answer and its bytes (`report_bytes`, counted once).
        self._pending: list[tuple[pb.ReportResultRequest, asyncio.Future[None], int]] = []
        self._sender: asyncio.Task[None] | None = None
        self._batches_supported = True

    def queued(self) -> bool:
        """Whether reports wait for the call in flight (they go out when it is answered)."""
        return bool(self._pending)

    async def send(self, report: pb.ReportResultRequest) -> None:
        """Deliver `report`; Refused if the server refused it, or the call's own error."""
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((report, answer, report_bytes(report)))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_pending())
        await answer

    async def _send_pending(self) -> None:
        batch: list[tuple[pb.ReportResultRequest, asyncio.Future[None]]] = []
        try:
            while self._pending:
                batch = self._take_batch()
                await self._send_batch(batch)
        except BaseException as exc:
            # Never leave a report waiting for an answer that will not come.
            _fail([*batch, *((report, answer) for report, answer, _ in self._pending)], exc)
            self._pending = []
            raise

    def _take_batch(self) -> list[tuple[pb.ReportResultRequest, asyncio.Future[None]]]:
        """The waiting reports that go in the next call: within both bounds, at least one."""
        taken = size = 0
        for _, _, report_size in self._pending[:MAX_BATCH]:
            size += report_size
            if taken and size > MAX_BATCH_BYTES:
                break
            taken += 1
        batch, self._pending = self._pending[:taken], self._pending[taken:]
        return [(report, answer) for report, answer, _ in batch]

    async def _send_batch(
        self, batch: list[tuple[pb.ReportResultRequest, asyncio.Future[None]]]
    ) -> None:
        if not self._batches_supported:
            await asyncio.gather(*(self._send_one(report, answer) for report, answer in batch))
            return
        request = pb.ReportResultsRequest(
            worker_id=self._worker_id, reports=[report for report, _ in batch]
        )
        try:
            response = await self._call("ReportResults", request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._batches_supported = False
                await self._send_batch(batch)
                return
            if is_too_large(exc.code(), exc.details()) and len(batch) > 1:
                # Larger than this server takes, although within the estimate: each half on
                # its own, rather than every outcome in it refused. A lone report's refusal
                # goes to its sender.
                half = len(batch) // 2
                await self._send_batch(batch[:half])
                await self._send_batch(batch[half:])
                return
            _fail(batch, exc)
            return
        except Exception as exc:
            _fail(batch, exc)
            return
        for (_, answer), outcome in zip(batch, response.outcomes, strict=True):
            if answer.done():
                continue
            if outcome.code == 0:
                answer.set_result(None)
            else:
                code = code_from_number(outcome.code)
                answer.set_exception(Refused(code, outcome.message))

    async def _send_one(self, report: pb.ReportResultRequest, answer: asyncio.Future[None]) -> None:
        try:
            await self._call("ReportResult", report)
        except Exception as exc:
            if not answer.done():
                answer.set_exception(exc)
        else:
            if not answer.done():
                answer.set_result(None)


def _fail(batch: list[tuple[Any, asyncio.Future[None]]], error: BaseException) -> None:
    for _, answer in batch:
        if not answer.done():
            answer.set_exception(error)
