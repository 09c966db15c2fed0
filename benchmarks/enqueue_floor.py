"""The floor under a sequential enqueue: Conveyor's transport and insert, none of its machinery.

    .venv/bin/python benchmarks/enqueue_floor.py --pg-url URL [--seconds 10]

W3's sequential target asks for 2,000 enqueues a second from one producer that waits for
each answer: 0.5 ms per enqueue, round trip and durable commit included. This script
measures what the design itself costs per enqueue, so that every run of the benchmark
shows how far Conveyor is from the best any implementation of it could do here.

A child process serves one bidirectional grpc.aio method on Conveyor's event loop (uvloop,
as the server). For each message, an `EnqueueStreamRequest` carrying one task exactly as
`AsyncClient` sends it, it runs Conveyor's own one-task insert (`task_insert_one`, from
queries.sql, on the migrated schema) on a connection from an asyncpg pool, and answers with
an `EnqueueStreamResponse`. This process sends the next request when the answer arrives,
as W3 single does (on the standard asyncio loop, as its producer). Nothing else: no
authentication gate, metrics, group commit, handoff, retries, deadlines or circuit
breakers. Any design with a Python gRPC server between the producer and PostgreSQL pays
about this much at least, so a target above this floor is out of the design's reach on this
machine, whatever Conveyor's own code does.

Prints one JSON object on its last stdout line, as the workload scripts do:
`tasks_per_second`, and the client's and the server's CPU per enqueue in µs.
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
WARM_UP = 200
START_TIMEOUT = 30.0


def serve(pg_url: str, port_file: str) -> None:
    """The floor server: decode, insert with Conveyor's statement, answer; nothing more."""

    async def enqueue(_requests: Any, context: Any) -> None:
        while (request := await context.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            spec = request.request.tasks[0]
            task = queries.NewTask(
                id=spec.id,
                type=spec.type,
                payload=spec.payload,
                timeout=spec.timeout.ToTimedelta(),
                max_retries=spec.max_retries,
            )
            async with pool.acquire() as conn:
                created = await queries.task_insert_one(conn, task)
            response = pb.EnqueueTasksResponse(task_ids=[spec.id], created=[created])
            await context.write(
                pb.EnqueueStreamResponse(request_id=request.request_id, response=response)
            )

    async def main() -> None:
        nonlocal pool
        pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=2)
        server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(
            enqueue,
            request_deserializer=pb.EnqueueStreamRequest.FromString,
            response_serializer=pb.EnqueueStreamResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("Floor", {"Enqueue": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))  # noqa: ASYNC240 - once, before any client
        await server.wait_for_termination()

    pool: Any = None
    event_loop.run(main())


def request(number: int, timeout: Duration) -> pb.EnqueueStreamRequest:
    """One task, as `AsyncClient.enqueue_task(Task(type=NOOP_TYPE))` sends it."""
    spec = pb.TaskSpec(
        id=new_task_ids(1)[0], type=NOOP_TYPE, timeout=timeout, max_retries=DEFAULT_MAX_RETRIES
    )
    return pb.EnqueueStreamRequest(request_id=number, request=pb.EnqueueTasksRequest(tasks=[spec]))


async def produce(address: str, server_pid: int, seconds: float) -> dict[str, float]:
    """Sequential enqueues for `seconds`: the rate, and CPU per enqueue on both ends."""
    timeout = Duration()
    timeout.FromTimedelta(DEFAULT_TIMEOUT)
    async with grpc.aio.insecure_channel(address) as channel:
        call: Any = channel.stream_stream(  # type: ignore[call-arg]
            METHOD,
            request_serializer=pb.EnqueueStreamRequest.SerializeToString,
            response_deserializer=pb.EnqueueStreamResponse.FromString,
        )()
        number = 0

        async def exchange() -> None:
            nonlocal number
            number += 1
            await call.write(request(number, timeout))
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
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(json.dumps({**result, "seconds": args.seconds, "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
