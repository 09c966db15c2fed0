"""FaultProxy: a TCP proxy that puts network faults between workers and servers.

The proxy listens on 127.0.0.1:<a free port> and forwards every connection to a target
(a Conveyor server's gRPC address). It runs an asyncio event loop in a background thread,
so a test controls it from its own thread while the traffic flows:

    with FaultProxy(server.address) as proxy:
        worker = cluster.worker(proxy, ...)          # the worker dials the proxy
        proxy.set_faults(delay=0.3, jitter=0.2, stall_probability=0.05)
        proxy.partition()                            # nothing gets through, both ways
        proxy.heal()                                 # traffic flows again
        proxy.pass_through()                         # no faults at all

Faults, per direction of each connection:

- delay: every chunk read from one side is written to the other `delay +- jitter` seconds
  later (uniform jitter, never negative). Order is kept per direction: a chunk is never
  written before the chunk read ahead of it, so a short delay drawn after a long one
  waits for it (as on a real link, where a TCP stream is delivered in order).
- "loss" as stalls: a user-space proxy cannot drop segments. It sits above two kernel TCP
  connections that already deliver every byte, in order; dropping a chunk would corrupt the
  stream (HTTP/2 frames) instead of modelling loss. What a lost segment does to an
  application on a real network is delay the stream until TCP retransmits it, so with
  probability `stall_probability` a chunk is held an extra 200-600 ms (everything behind it
  in that direction waits too).
- partition, mode "blackhole": nothing is forwarded either way. Bytes already in flight
  and bytes sent meanwhile are held, and new connections are accepted but not connected
  upstream (the client's HTTP/2 handshake never completes), so calls hang until their
  deadlines, like a network that silently drops everything. `heal()` delivers what was
  held, like TCP retransmitting once the network is back (connections that outlived the
  partition carry on).
- partition, mode "reset": every open connection is reset (RST, via SO_LINGER 0) and new
  connections are reset at once until `heal()`, like a firewall rejecting the traffic.

When the target refuses a connection (the server is down), the client's connection is
reset too, so the client sees a failure at once, as it would without the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from types import TracebackType

CHUNK_BYTES = 64 * 1024
# The extra hold of a "lost" chunk: roughly one TCP retransmission timeout (RTO min 200 ms).
STALL_SECONDS = (0.2, 0.6)
CONTROL_TIMEOUT = 10.0

PartitionMode = Literal["blackhole", "reset"]


@dataclass(frozen=True, slots=True)
class Faults:
    """What the proxy does to each chunk."""

    delay: float = 0.0
    jitter: float = 0.0
    stall_probability: float = 0.0


@dataclass(slots=True)
class ProxyStats:
    """Counters, for reports and for tests that want to see the faults happen."""

    connections: int = 0
    chunks: int = 0
    bytes: int = 0
    stalls: int = 0
    resets: int = 0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Connection:
    """One proxied connection: the client's side and, once connected, the target's."""

    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    upstream_writer: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client_writer, self.upstream_writer) if w is not None]

    def reset(self) -> None:
        for writer in self.writers():
            _reset(writer)
        for task in self.tasks:
            task.cancel()

    def close(self) -> None:
        for writer in self.writers():
            if not writer.transport.is_closing():
                writer.close()


class FaultProxy:
    """A controllable TCP proxy to `target` ("host:port"), running in a background thread."""

    def __init__(self, target: str, *, name: str = "proxy", seed: int | None = None) -> None:
        """Nothing listens until `start` (or entering the context manager)."""
        host, _, port = target.rpartition(":")
        self.target = target
        self._target_host = host
        self._target_port = int(port)
        self.name = name
        self.stats = ProxyStats()
        self._random = random.Random(seed)  # only used on the proxy's loop
        self._faults = Faults()
        self._partition: PartitionMode | None = None
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._healed: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"fault-{name}", daemon=True)
        self.port = 0

    # --- life cycle -----------------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where clients connect: "127.0.0.1:<port>"."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Listen on a free port and start forwarding (pass-through)."""
        self._thread.start()
        self._ready.wait(CONTROL_TIMEOUT)
        if self._error is not None:
            raise self._error
        if not self.port:
            raise RuntimeError(f"{self.name} did not start listening")
        return self

    def close(self) -> None:
        """Stop listening, reset every connection, stop the thread (safe to call twice)."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if self._thread.is_alive():
            self._thread.join(CONTROL_TIMEOUT)

    def __enter__(self) -> Self:
        """Start; `close` on exit."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the proxy."""
        self.close()

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._healed = asyncio.Event()
        self._healed.set()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for connection in list(self._connections):
                connection.reset()
                connection.close()
            await server.wait_closed()
            pending = [t for c in self._connections for t in c.tasks if not t.done()]
            if pending:
                await asyncio.wait(pending, timeout=CONTROL_TIMEOUT)

    # --- control (thread-safe) -------------------------------------------------------------

    def _control(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError(f"{self.name} is not started")
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CONTROL_TIMEOUT)

    def set_faults(
        self, *, delay: float = 0.0, jitter: float = 0.0, stall_probability: float = 0.0
    ) -> None:
        """Delay each chunk by `delay +- jitter` s; stall it 200-600 ms more with probability p."""
        if delay < 0 or jitter < 0 or not 0 <= stall_probability <= 1:
            raise ValueError("delay and jitter must be >= 0, stall_probability in [0, 1]")
        faults = Faults(delay=delay, jitter=jitter, stall_probability=stall_probability)

        async def apply() -> None:
            self._faults = faults

        self._control(apply())

    def partition(self, mode: PartitionMode = "blackhole") -> None:
        """Stop forwarding both ways: hold everything ("blackhole") or reset ("reset")."""

        async def apply() -> None:
            assert self._healed is not None
            self._partition = mode
            self._healed.clear()
            if mode == "reset":
                for connection in list(self._connections):
                    self.stats.resets += 1
                    connection.reset()

        self._control(apply())

    def heal(self) -> None:
        """End a partition: held traffic and held connections go through."""

        async def apply() -> None:
            assert self._healed is not None
            self._partition = None
            self._healed.set()

        self._control(apply())

    def pass_through(self) -> None:
        """No faults at all: heal any partition and forget delays and stalls."""
        self.set_faults()
        self.heal()

    @property
    def partitioned(self) -> bool:
        """Whether a partition is in force."""
        return self._partition is not None

    # --- forwarding -------------------------------------------------------------------------

    def _chunk_delay(self) -> float:
        faults = self._faults
        delay = faults.delay
        if faults.jitter:
            delay += self._random.uniform(-faults.jitter, faults.jitter)
        if faults.stall_probability and self._random.random() < faults.stall_probability:
            self.stats.stalls += 1
            delay += self._random.uniform(*STALL_SECONDS)
        return max(0.0, delay)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._healed is not None
        self.stats.connections += 1
        connection = _Connection(reader, writer)
        self._connections.add(connection)
        try:
            if self._partition == "reset":
                self.stats.resets += 1
                _reset(writer)
                return
            # Blackhole: the connection is accepted but goes nowhere until the heal.
            await self._healed.wait()
            if writer.transport.is_closing():
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    self._target_host, self._target_port
                )
            except OSError:
                _reset(writer)  # the target is down: the client sees a refused connection
                return
            connection.upstream_writer = upstream_writer
            connection.tasks = [
                asyncio.create_task(self._pump(reader, upstream_writer)),
                asyncio.create_task(self._pump(upstream_reader, writer)),
            ]
            results = await asyncio.gather(*connection.tasks, return_exceptions=True)
            if any(isinstance(result, BaseException) for result in results):
                connection.reset()
        finally:
            connection.close()
            self._connections.discard(connection)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy one direction, each chunk released at its own time, in order."""
        assert self._loop is not None
        loop = self._loop
        # (release time, data); b"" is the end of the stream, None a broken connection.
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

        async def read() -> None:
            last_release = 0.0
            while True:
                try:
                    data: bytes | None = await source.read(CHUNK_BYTES)
                except (ConnectionError, OSError):
                    data = None
                release = max(loop.time() + self._chunk_delay(), last_release)
                last_release = release
                queue.put_nowait((release, data))
                if not data:
                    return

        reader = asyncio.create_task(read())
        try:
            while True:
                release, data = await queue.get()
                await self._forwarding()
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    await self._forwarding()
                if data is None:
                    raise ConnectionResetError("the other side of the proxy reset")
                if not data:
                    if sink.can_write_eof() and not sink.transport.is_closing():
                        sink.write_eof()
                    return
                self.stats.chunks += 1
                self.stats.bytes += len(data)
                sink.write(data)
                await sink.drain()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await reader

    async def _forwarding(self) -> None:
        """Return when traffic may flow (at once unless partitioned)."""
        assert self._healed is not None
        await self._healed.wait()
