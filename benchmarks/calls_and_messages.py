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

- **grpclib stream** (with `--grpclib`): the same exchange with grpclib, a pure-Python
  gRPC over asyncio, at both ends (its own echo server, on the same loop). grpcio hands
  every message between its C core's poller thread and the event loop; grpclib does not.
  It measures what a change of gRPC library would buy (docs/performance.md, "The
  twenty-second round"); the bench extra installs it.

For each: the client's CPU, the wall time and the server's CPU per exchange, medians over
alternating rounds (this machine's speed drifts within minutes). `--size` sets the
message's bytes (64 by default: an enqueue of one task; a lease batch or a bulk enqueue
is tens of KiB). Prints a table and writes benchmarks/results/calls_and_messages.json.

    .venv/bin/python benchmarks/calls_and_messages.py [--rounds 3] [--exchanges 3000]
        [--size 64] [--grpclib]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import grpc
from grpclib.client import Channel, StreamStreamMethod
from grpclib.const import Cardinality, Handler
from grpclib.server import Server as GrpclibServer

from conveyor import event_loop

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

WARM_UP = 100
RESULTS = Path(__file__).parent / "results" / "calls_and_messages.json"


def _same(data: bytes) -> bytes:
    return data


def serve(port_file: str) -> None:
    """The grpcio echo server: a unary method and a bidirectional one answering each message."""

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


class RawBytes:
    """grpclib's codec for messages that are already bytes, as grpcio's `_same` leaves them."""

    __content_subtype__ = "proto"

    def encode(self, message: bytes, _message_type: Any) -> bytes:
        return message

    def decode(self, data: bytes, _message_type: Any) -> bytes:
        return data


def serve_grpclib(port_file: str) -> None:
    """The grpclib echo server: the bidirectional method only."""

    class Echo:
        async def stream(self, stream: Any) -> None:
            async for message in stream:
                await stream.send_message(message)

        def __mapping__(self) -> dict[str, Handler]:
            return {"/Echo/Stream": Handler(self.stream, Cardinality.STREAM_STREAM, None, None)}

    async def main() -> None:
        server = GrpclibServer([Echo()], codec=RawBytes())  # type: ignore[arg-type]
        # grpclib reports no port it chose: bound here first, the socket is handed to it.
        listening = socket.create_server(("127.0.0.1", 0))
        await server.start(sock=listening)
        port = listening.getsockname()[1]
        Path(port_file).write_text(str(port))  # noqa: ASYNC240 - once, before any client
        await server.wait_closed()

    event_loop.run(main())


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Times `count` exchanges (of `payload`): client CPU, wall time and server CPU, in µs each."""

    def __init__(self, server_pid: int, count: int, payload: bytes = b"") -> None:
        self.server_pid = server_pid
        self.count = count
        self.payload = payload

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
        await call(meter.payload)
    with meter:
        for _ in range(meter.count):
            await call(meter.payload)
    return meter.result


async def stream_exchanges(
    meter: Meter, send: Callable[[bytes], Awaitable[Any]], receive: Callable[[], Awaitable[Any]]
) -> dict[str, float]:
    """A message each way on an open stream, `meter.count` times after a warm-up."""
    for _ in range(WARM_UP):
        await send(meter.payload)
        await receive()
    with meter:
        for _ in range(meter.count):
            await send(meter.payload)
            await receive()
    return meter.result


async def async_stream(channel: grpc.aio.Channel, meter: Meter) -> dict[str, float]:
    call: Any = channel.stream_stream("/Echo/Stream", _same, _same)()  # type: ignore[call-arg]
    result = await stream_exchanges(meter, call.write, call.read)
    await call.done_writing()
    return result


def sync_unary(channel: grpc.Channel, meter: Meter) -> dict[str, float]:
    call = channel.unary_unary("/Echo/Unary", _same, _same)
    for _ in range(WARM_UP):
        call(meter.payload)
    with meter:
        for _ in range(meter.count):
            call(meter.payload)
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
        outgoing.put(meter.payload)
        answer.result(timeout=10)

    for _ in range(WARM_UP):
        exchange()
    with meter:
        for _ in range(meter.count):
            exchange()
    outgoing.put(None)  # half-close: the server ends the call, and the reader returns
    reader.join(timeout=10)
    return meter.result


async def grpclib_stream(address: str, meter: Meter) -> dict[str, float]:
    host, port = address.rsplit(":", 1)
    channel = Channel(host, int(port), codec=RawBytes())  # type: ignore[arg-type]
    try:
        method: Any = StreamStreamMethod(channel, "/Echo/Stream", None, None)  # type: ignore[arg-type]
        async with method.open() as call:
            result = await stream_exchanges(meter, call.send_message, call.recv_message)
            await call.end()
    finally:
        channel.close()
    return result


EchoServer = tuple[str, int]  # address, pid


def measure(
    servers: dict[str, EchoServer], rounds: int, count: int, payload: bytes
) -> dict[str, list[Any]]:
    results: dict[str, list[Any]] = {}
    address, pid = servers["grpcio"]

    async def on_aio(kind: str) -> dict[str, float]:
        if kind == "grpclib stream":
            return await grpclib_stream(
                servers["grpclib"][0], Meter(servers["grpclib"][1], count, payload)
            )
        async with grpc.aio.insecure_channel(address) as channel:
            run = async_unary if kind == "async unary" else async_stream
            return await run(channel, Meter(pid, count, payload))

    kinds = ["async unary", "async stream", "sync unary", "sync stream"]
    if "grpclib" in servers:
        kinds.append("grpclib stream")
    for round_number in range(rounds):
        # Alternate the order, so a slow minute does not always fall on the same kind.
        for kind in kinds if round_number % 2 == 0 else kinds[::-1]:
            if kind.startswith("sync"):
                with grpc.insecure_channel(address) as channel:
                    run = sync_unary if kind == "sync unary" else sync_stream
                    result = run(channel, Meter(pid, count, payload))
            else:
                result = event_loop.run(on_aio(kind))
            results.setdefault(kind, []).append(result)
    return results


@contextlib.contextmanager
def echo_server(library: str) -> Iterator[EchoServer]:
    """An echo server of `library` in a child process, stopped on exit."""
    port_file = Path(f"/tmp/conveyor-echo-{os.getpid()}-{library}.port")  # noqa: S108 - a bench scratch file
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, __file__, "--serve", library, str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"the {library} echo server did not start")
            time.sleep(0.05)
        yield f"127.0.0.1:{port_file.read_text()}", server.pid
    finally:
        server.terminate()
        server.wait(timeout=10)
        port_file.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--exchanges", type=int, default=3000)
    parser.add_argument("--size", type=int, default=64, help="Bytes per message.")
    parser.add_argument("--grpclib", action="store_true", help="Also measure grpclib at both ends.")
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        library, port_file = args.serve
        (serve_grpclib if library == "grpclib" else serve)(port_file)
        return
    with contextlib.ExitStack() as stack:
        servers = {"grpcio": stack.enter_context(echo_server("grpcio"))}
        if args.grpclib:
            servers["grpclib"] = stack.enter_context(echo_server("grpclib"))
        results = measure(servers, args.rounds, args.exchanges, b"x" * args.size)
    print(f"{args.size} bytes a message")
    print(f"{'per exchange, µs (median)':28} {'client CPU':>11} {'wall':>8} {'server CPU':>11}")
    for kind, runs in results.items():
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(
            f"{kind:28} {medians['client_cpu_us']:11.0f} {medians['wall_us']:8.0f} "
            f"{medians['server_cpu_us']:11.0f}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"size": args.size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
