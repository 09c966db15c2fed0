"""What Python gRPC costs per exchange here: a unary call against a message on a stream.

The design of Conveyor's streams (the workers' `Work`, the producers' `EnqueueStream`)
rests on one measurement: on a small machine, a unary call costs far more CPU and time
than a message each way on a call already open. This script makes that measurement
reproducible. It starts a bare echo server in a child process (grpc.aio on the event loop
Conveyor's server uses), then, from this process, sends small messages one after another:

- **async unary** / **async stream**: grpc.aio calls, or messages on one open call
  (`write` then `read`), as `AsyncClient` and the worker do;
- **sync unary** / **sync stream**: the blocking API, the stream fed from a queue and read
  by a thread, as `Client` does.

For each: the client's CPU, the wall time and the server's CPU per exchange, medians over
alternating rounds (this machine's speed drifts within minutes). Prints a table and writes
benchmarks/results/calls_and_messages.json.

    .venv/bin/python benchmarks/calls_and_messages.py [--rounds 3] [--exchanges 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Self

import grpc

from conveyor import event_loop

PAYLOAD = b"x" * 64
WARM_UP = 100
RESULTS = Path(__file__).parent / "results" / "calls_and_messages.json"


def _same(data: bytes) -> bytes:
    return data


def serve(port_file: str) -> None:
    """The echo server: a unary method and a bidirectional one answering each message."""

    async def unary(message: bytes, _context: Any) -> bytes:
        return message

    async def stream(_requests: Any, context: Any) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            await context.write(message)

    async def main() -> None:
        server = grpc.aio.server()
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, _same, _same),
            "Stream": grpc.stream_stream_rpc_method_handler(stream, _same, _same),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("Echo", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))  # noqa: ASYNC240 - once, before any client
        await server.wait_for_termination()

    event_loop.run(main())


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Times `count` exchanges: client CPU, wall time and server CPU, in µs per exchange."""

    def __init__(self, server_pid: int, count: int) -> None:
        self.server_pid = server_pid
        self.count = count

    def __enter__(self) -> Self:
        self.server = cpu_seconds(self.server_pid)
        self.cpu = time.process_time()
        self.wall = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        per = 1e6 / self.count
        self.result = {
            "client_cpu_us": (time.process_time() - self.cpu) * per,
            "wall_us": (time.perf_counter() - self.wall) * per,
            "server_cpu_us": (cpu_seconds(self.server_pid) - self.server) * per,
        }


async def async_unary(channel: grpc.aio.Channel, meter: Meter) -> dict[str, float]:
    call = channel.unary_unary("/Echo/Unary", _same, _same)
    for _ in range(WARM_UP):
        await call(PAYLOAD)
    with meter:
        for _ in range(meter.count):
            await call(PAYLOAD)
    return meter.result


async def async_stream(channel: grpc.aio.Channel, meter: Meter) -> dict[str, float]:
    call: Any = channel.stream_stream("/Echo/Stream", _same, _same)()  # type: ignore[call-arg]
    for _ in range(WARM_UP):
        await call.write(PAYLOAD)
        await call.read()
    with meter:
        for _ in range(meter.count):
            await call.write(PAYLOAD)
            await call.read()
    await call.done_writing()
    return meter.result


def sync_unary(channel: grpc.Channel, meter: Meter) -> dict[str, float]:
    call = channel.unary_unary("/Echo/Unary", _same, _same)
    for _ in range(WARM_UP):
        call(PAYLOAD)
    with meter:
        for _ in range(meter.count):
            call(PAYLOAD)
    return meter.result


def sync_stream(channel: grpc.Channel, meter: Meter) -> dict[str, float]:
    outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    waiting: queue.SimpleQueue[Future[bytes]] = queue.SimpleQueue()

    def requests() -> Any:
        while (message := outgoing.get()) is not None:
            yield message

    call = channel.stream_stream("/Echo/Stream", _same, _same)(requests())

    def read() -> None:
        for answer in call:
            waiting.get().set_result(answer)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def exchange() -> None:
        answer: Future[bytes] = Future()
        waiting.put(answer)
        outgoing.put(PAYLOAD)
        answer.result(timeout=10)

    for _ in range(WARM_UP):
        exchange()
    with meter:
        for _ in range(meter.count):
            exchange()
    outgoing.put(None)  # half-close: the server ends the call, and the reader returns
    reader.join(timeout=10)
    return meter.result


def measure(address: str, server_pid: int, rounds: int, count: int) -> dict[str, list[Any]]:
    results: dict[str, list[Any]] = {}

    async def on_aio(kind: str) -> dict[str, float]:
        async with grpc.aio.insecure_channel(address) as channel:
            run = async_unary if kind == "async unary" else async_stream
            return await run(channel, Meter(server_pid, count))

    kinds = ["async unary", "async stream", "sync unary", "sync stream"]
    for round_number in range(rounds):
        # Alternate the order, so a slow minute does not always fall on the same kind.
        for kind in kinds if round_number % 2 == 0 else kinds[::-1]:
            if kind.startswith("async"):
                result = event_loop.run(on_aio(kind))
            else:
                with grpc.insecure_channel(address) as channel:
                    run = sync_unary if kind == "sync unary" else sync_stream
                    result = run(channel, Meter(server_pid, count))
            results.setdefault(kind, []).append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--exchanges", type=int, default=3000)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    port_file = Path(f"/tmp/conveyor-echo-{os.getpid()}.port")  # noqa: S108 - a bench scratch file
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the echo server did not start")
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text()}"
        results = measure(address, server.pid, args.rounds, args.exchanges)
    finally:
        server.terminate()
        server.wait(timeout=10)
        port_file.unlink(missing_ok=True)
    print(f"{'per exchange, µs (median)':28} {'client CPU':>11} {'wall':>8} {'server CPU':>11}")
    for kind, runs in results.items():
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(
            f"{kind:28} {medians['client_cpu_us']:11.0f} {medians['wall_us']:8.0f} "
            f"{medians['server_cpu_us']:11.0f}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
