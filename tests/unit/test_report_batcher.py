"""ReportBatcher's rules, driven by a scripted `call` function (the transport is tested end
to end in tests/integration/test_fencing.py; here, only what the batcher decides)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.worker.reporting import MAX_BATCH_BYTES, Refused, ReportBatcher

MIB = 1024 * 1024


def report(task: str, result: bytes = b"") -> pb.ReportResultRequest:
    return pb.ReportResultRequest(
        worker_id="w", task_id=task, outcome=pb.OUTCOME_SUCCEEDED, result=result
    )


class Server:
    """Answers like a server would; records what it was sent."""

    def __init__(
        self,
        *,
        knows_batches: bool = True,
        refuse: frozenset[str] = frozenset(),
        message_limit: int | None = None,
    ):
        self.knows_batches = knows_batches
        self.refuse = refuse
        self.message_limit = message_limit
        self.calls: list[tuple[str, list[str]]] = []
        self.gate = asyncio.Event()
        self.first_in_flight = asyncio.Event()

    async def call(self, method: str, request):
        if method == "ReportResults":
            tasks = [r.task_id for r in request.reports]
            self.calls.append((method, tasks))
            if not self.knows_batches:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata()
                )
            size = request.ByteSize()
            if self.message_limit is not None and size > self.message_limit:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    f"SERVER: Received message larger than max ({size} vs. {self.message_limit})",
                )
            await self.hold()
            return pb.ReportResultsResponse(
                outcomes=[
                    pb.ReportOutcome(
                        code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="stale"
                    )
                    if task in self.refuse
                    else pb.ReportOutcome(code=0)
                    for task in tasks
                ]
            )
        self.calls.append((method, [request.task_id]))
        await self.hold()
        return pb.ReportResultResponse()

    async def hold(self) -> None:
        """Hold the first call in flight, so the others queue up behind it."""
        self.first_in_flight.set()
        await self.gate.wait()


async def send_all(
    batcher: ReportBatcher, server: Server, tasks: list[str], result: bytes = b""
) -> list:
    """The first report goes out alone (held in flight); the others queue behind it."""
    first = asyncio.ensure_future(batcher.send(report(tasks[0], result)))
    await server.first_in_flight.wait()
    rest = [asyncio.ensure_future(batcher.send(report(task, result))) for task in tasks[1:]]
    await asyncio.sleep(0)  # let them reach the queue before the first call returns
    server.gate.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


class TestReportBatcher:
    def test_a_lone_report_goes_alone_and_the_queue_goes_together(self) -> None:
        async def scenario():
            server = Server(refuse=frozenset({"c"}))
            results = await send_all(ReportBatcher("w", server.call), server, ["a", "b", "c"])
            return server.calls, results

        calls, results = asyncio.run(scenario())
        # A batch of one is still a batch: the runtime may carry any batch on its stream.
        assert calls == [("ReportResults", ["a"]), ("ReportResults", ["b", "c"])]
        assert results[0] is None
        assert results[1] is None
        assert isinstance(results[2], Refused)
        assert results[2].code() is grpc.StatusCode.FAILED_PRECONDITION
        assert results[2].details() == "stale"

    def test_an_old_server_gets_one_report_per_call(self) -> None:
        async def scenario():
            server = Server(knows_batches=False)
            batcher = ReportBatcher("w", server.call)
            results = await send_all(batcher, server, ["a", "b", "c"])
            return server.calls, results

        calls, results = asyncio.run(scenario())
        assert results == [None, None, None]
        assert calls == [
            ("ReportResults", ["a"]),
            ("ReportResult", ["a"]),
            ("ReportResult", ["b"]),
            ("ReportResult", ["c"]),
        ]

    def test_a_failed_call_fails_every_report_in_it(self) -> None:
        class Down(Exception):
            pass

        async def call(_method, _request):
            raise Down

        async def scenario():
            batcher = ReportBatcher("w", call)
            return await asyncio.gather(
                batcher.send(report("a")), batcher.send(report("b")), return_exceptions=True
            )

        results = asyncio.run(scenario())
        assert [type(result) for result in results] == [Down, Down]
        with pytest.raises(Down):
            raise results[0]

    def test_batches_are_cut_by_bytes_as_well_as_by_count(self) -> None:
        """Thirty 1 MiB results queued together go in batches of at most MAX_BATCH_BYTES
        (8 MiB), not as one 30 MiB message over every server's limit."""

        async def scenario():
            server = Server()
            tasks = [f"t{i}" for i in range(31)]
            results = await send_all(ReportBatcher("w", server.call), server, tasks, b"r" * MIB)
            return server.calls, results

        calls, results = asyncio.run(scenario())
        assert results == [None] * 31
        sizes = [len(tasks) for _, tasks in calls]
        assert sizes == [1, 7, 7, 7, 7, 2]
        assert all(size * MIB < MAX_BATCH_BYTES for size in sizes)

    def test_a_report_larger_than_the_byte_bound_goes_alone(self) -> None:
        async def scenario():
            server = Server()
            batcher = ReportBatcher("w", server.call)
            first = asyncio.ensure_future(batcher.send(report("small")))
            await server.first_in_flight.wait()
            rest = [
                asyncio.ensure_future(batcher.send(report("big", b"x" * (9 * MIB)))),
                asyncio.ensure_future(batcher.send(report("after"))),
            ]
            await asyncio.sleep(0)
            server.gate.set()
            await asyncio.gather(first, *rest)
            return server.calls

        assert asyncio.run(scenario()) == [
            ("ReportResults", ["small"]),
            ("ReportResults", ["big"]),
            ("ReportResults", ["after"]),
        ]

    def test_a_batch_over_the_server_message_limit_is_split_and_sent_again(self) -> None:
        """A server whose limit is below the estimate (here 3 MiB) refuses the batch whole;
        its halves go again, down to lone reports, and only a report that cannot fit alone
        gets the refusal."""

        async def scenario():
            server = Server(message_limit=3 * MIB)
            tasks = [f"t{i}" for i in range(6)]
            return await send_all(ReportBatcher("w", server.call), server, tasks, b"r" * MIB)

        assert asyncio.run(scenario()) == [None] * 6

        async def too_large_alone():
            server = Server(message_limit=MIB // 2)
            server.gate.set()
            batcher = ReportBatcher("w", server.call)
            return await asyncio.gather(
                batcher.send(report("a", b"r" * MIB)),
                batcher.send(report("b", b"r" * MIB)),
                return_exceptions=True,
            )

        results = asyncio.run(too_large_alone())
        assert [type(result) for result in results] == [grpc.aio.AioRpcError] * 2
        assert all(result.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for result in results)
