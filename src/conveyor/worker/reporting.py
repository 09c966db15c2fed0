"""ReportBatcher: a worker's outcome reports, sent together when they finish together.

Each attempt's outcome is one report. Sent one call each, reports cost a worker a quarter
of its time in gRPC call overhead at high throughput (profiled under the benchmark's
drain). Here a report goes out at once when no report call is in flight; reports made while
one is in flight wait for it and go together in the next `ReportResults` call (at most
`MAX_BATCH`). A lone report is a batch of one too, so that the runtime can carry every
batch on its Work stream when one is open (`call` decides the path).

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

from conveyor.protocol.status import AnsweredStatus, code_from_number
from conveyor.protocol.v1 import conveyor_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

MAX_BATCH: Final = 256


class Refused(AnsweredStatus):
    """The server answered this report with an error status (like grpc.aio.AioRpcError)."""


class ReportBatcher:
    """Sends reports through `call(method, request)`, together when they queue up."""

    def __init__(self, worker_id: str, call: Callable[[str, Any], Awaitable[Any]]) -> None:
        """`call` raises for a call that failed as a whole (no server answered)."""
        self._worker_id = worker_id
        self._call = call
        self._pending: list[tuple[pb.ReportResultRequest, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None
        self._batches_supported = True

    def queued(self) -> bool:
        """Whether reports wait for the call in flight (they go out when it is answered)."""
        return bool(self._pending)

    async def send(self, report: pb.ReportResultRequest) -> None:
        """Deliver `report`; Refused if the server refused it, or the call's own error."""
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((report, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_pending())
        await answer

    async def _send_pending(self) -> None:
        batch: list[tuple[pb.ReportResultRequest, asyncio.Future[None]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                await self._send_batch(batch)
        except BaseException as exc:
            # Never leave a report waiting for an answer that will not come.
            _fail([*batch, *self._pending], exc)
            self._pending = []
            raise

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
