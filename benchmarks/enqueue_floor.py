"""The floor under a sequential enqueue: Conveyor's transport and insert, none of its machinery.

    .venv/bin/python benchmarks/enqueue_floor.py --pg-url URL [--seconds 10]

W3's sequential target asks for 2,000 enqueues a second from one producer that waits for
each answer: 0.5 ms per enqueue, round trip and durable commit included. This script
measures what the design itself costs per enqueue, so that every run of the benchmark
shows how far Conveyor is from the best any implementation of it could do here.

A child process serves one bidirectional grpc.aio method on Conveyor's event loop (uvloop,
as the server). For each message, an `EnqueueStreamRequest` carrying one task exactly as
`AsyncClient` sends it, it runs Conveyor's own one-task insert (`task_insert_one`, from
queries.sql, on the migrated schema) on a connection of its own, and answers with an
`EnqueueStreamResponse`. (Until the nineteenth session it took a connection from an
asyncpg pool with asyncpg's default reset on release: a round trip more per enqueue than
Conveyor makes, so the floor measured 920-1,000/s where a connection of its own does
1,260-1,300; docs/performance.md, "The nineteenth round".) This process sends the next
request when the answer arrives, as W3 single does (on the standard asyncio loop, as its
producer). Nothing else: no authentication gate, metrics, group commit, handoff,
retries, deadlines or circuit breakers. Any design with a Python gRPC server between the
producer and PostgreSQL pays about this much at least, so a target above this floor is out
of the design's reach on this machine, whatever Conveyor's own code does.

The floor's two parts are also timed alone, each as fast as it goes here: the transport (the
same server answering the same request without the insert: a message each way on an open
stream) and the insert with its commit (the same statement, one after another, from one
asyncpg connection on uvloop, with no gRPC at all). A sequential enqueue needs both, one
after the other, whatever the design: its task is inserted after its request arrives and
answered after its commit. So the sum of their times per call is the least an enqueue
takes here (`bound_per_second` is its inverse), even for a server that ran no code at all
between the two parts. A sequential target above that bound cannot be met on this machine
by any design that puts a Python gRPC server between the producer and PostgreSQL and
commits each enqueue before answering it.

Prints one JSON object on its last stdout line, as the workload scripts do:
`tasks_per_second`, the client's and the server's CPU per enqueue in µs, and the parts
alone: `transport_alone_us`, `insert_alone_us` (wall time per call) and `bound_per_second`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from apps import NOOP_TYPE
from calls_and_messages import Meter
from google.protobuf.duration_pb2 import Duration

from conveyor import event_loop
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.storage import migrate, queries
from conveyor.types import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, new_task_ids

METHOD = "/Floor/Enqueue"
ECHO_METHOD = "/Floor/Echo"
WARM_UP = 200
START_TIMEOUT = 30.0


def serve(pg_url: str, port_file: str) -> None:
    """The floor server: decode, insert with Conveyor's statement, answer; nothing more."""
    conn: Any = None  # the server's one connection, opened by main()

    def answering(*, insert: bool) -> Any:
        """The method: each request inserted and answered, or (the transport alone) answered."""

        async def method(_requests: Any, context: Any) -> None:
            while (request := await context.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                spec = request.request.tasks[0]
                created = await queries.task_insert_one(conn, task_of(spec)) if insert else True
                response = pb.EnqueueTasksResponse(task_ids=[spec.id], created=[created])
                await context.write(
                    pb.EnqueueStreamResponse(request_id=request.request_id, response=response)
                )

        return method

    async def main() -> None:
        nonlocal conn
        conn = await asyncpg.connect(pg_url)
        server = grpc.aio.server()
        handlers = {
            name: grpc.stream_stream_rpc_method_handler(
                behaviour,
                request_deserializer=pb.EnqueueStreamRequest.FromString,
                response_serializer=pb.EnqueueStreamResponse.SerializeToString,
            )
            for name, behaviour in (
                ("Enqueue", answering(insert=True)),
                ("Echo", answering(insert=False)),
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("Floor", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))  # noqa: ASYNC240 - once, before any client
        await server.wait_for_termination()

    event_loop.run(main())


def new_spec() -> pb.TaskSpec:
    """One task, as `AsyncClient.enqueue_task(Task(type=NOOP_TYPE))` sends it."""
    timeout = Duration()
    timeout.FromTimedelta(DEFAULT_TIMEOUT)
    return pb.TaskSpec(
        id=new_task_ids(1)[0], type=NOOP_TYPE, timeout=timeout, max_retries=DEFAULT_MAX_RETRIES
    )


def request(number: int) -> pb.EnqueueStreamRequest:
    """Request `number` of a stream, carrying one new task."""
    return pb.EnqueueStreamRequest(
        request_id=number, request=pb.EnqueueTasksRequest(tasks=[new_spec()])
    )


def task_of(spec: pb.TaskSpec) -> queries.NewTask:
    """The row the floor inserts for a task as the client sent it."""
    return queries.NewTask(
        id=spec.id,
        type=spec.type,
        payload=spec.payload,
        timeout=spec.timeout.ToTimedelta(),
        max_retries=spec.max_retries,
    )


async def insert_alone(pg_url: str, seconds: float) -> float:
    """µs of wall time per sequential insert and commit, with no gRPC on the way."""
    conn = await asyncpg.connect(pg_url)
    try:
        for _ in range(WARM_UP):
            await queries.task_insert_one(conn, task_of(new_spec()))
        count = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            if not await queries.task_insert_one(conn, task_of(new_spec())):
                raise RuntimeError("the insert created no task")
            count += 1
        return (time.perf_counter() - started) * 1e6 / count
    finally:
        await conn.close()


async def produce(
    address: str, server_pid: int, seconds: float, method: str = METHOD
) -> dict[str, float]:
    """Sequential exchanges for `seconds`: the rate, and CPU per exchange on both ends."""
    async with grpc.aio.insecure_channel(address) as channel:
        call: Any = channel.stream_stream(  # type: ignore[call-arg]
            method,
            request_serializer=pb.EnqueueStreamRequest.SerializeToString,
            response_deserializer=pb.EnqueueStreamResponse.FromString,
        )()
        number = 0

        async def exchange() -> None:
            nonlocal number
            number += 1
            await call.write(request(number))
            answer = await call.read()
            if answer.request_id != number or not answer.response.created[0]:
                raise RuntimeError(f"unexpected answer to request {number}: {answer}")

        for _ in range(WARM_UP):
            await exchange()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        count = 0
        meter = Meter(server_pid, 1)
        with meter:
            while loop.time() < deadline:
                await exchange()
                count += 1
        await call.done_writing()
    # Meter divides by its count, which was unknown until now: scale its per-one figures.
    wall = meter.result["wall_us"] / 1e6
    return {
        "tasks_per_second": round(count / wall, 1),
        "wall_us_per_task": round(meter.result["wall_us"] / count, 1),
        "tasks": count,
        "client_cpu_us_per_task": round(meter.result["client_cpu_us"] / count, 1),
        "server_cpu_us_per_task": round(meter.result["server_cpu_us"] / count, 1),
    }


async def prepare(pg_url: str) -> None:
    """Conveyor's schema on the (fresh) database, as `conveyor server --migrate` makes it."""
    conn = await asyncpg.connect(pg_url)
    try:
        await migrate.migrate(conn)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.pg_url, args.serve)
        return
    asyncio.run(prepare(args.pg_url))
    with tempfile.TemporaryDirectory(prefix="conveyor-floor-") as scratch:
        port_file = Path(scratch) / "port"
        argv = [sys.executable, __file__, "--pg-url", args.pg_url, "--serve", str(port_file)]
        server = subprocess.Popen(argv)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("the floor server did not start")
                time.sleep(0.05)
            address = f"127.0.0.1:{port_file.read_text()}"
            # The standard loop, as conveyor_workloads.py's producer runs on.
            result = asyncio.run(produce(address, server.pid, args.seconds))
            # The transport alone, its client on the standard loop as W3's producer is: the
            # bound is that producer's (one on uvloop pays less for its end of the exchange).
            echo = asyncio.run(produce(address, server.pid, args.seconds, ECHO_METHOD))
        finally:
            server.terminate()
            server.wait(timeout=10)
    insert_us = event_loop.run(insert_alone(args.pg_url, args.seconds))
    transport_us = echo["wall_us_per_task"]
    parts = {
        "transport_alone_us": transport_us,
        "transport_client_cpu_us": echo["client_cpu_us_per_task"],
        "transport_server_cpu_us": echo["server_cpu_us_per_task"],
        "insert_alone_us": round(insert_us, 1),
        "bound_per_second": round(1e6 / (transport_us + insert_us), 1),
    }
    print(json.dumps({**result, **parts, "seconds": args.seconds, "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
