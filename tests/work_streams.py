"""A raw `Work` stream driven from a test thread (see tests/integration/test_work_stream.py).

`RawStream` sends requests as the test makes them and collects responses on a reader
thread, so a test can wait for each with a deadline and see how the call ended.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import grpc

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

ENDED = object()  # what `RawStream.take` gives once the call has ended OK
TAKE_TIMEOUT = 10.0


class RawStream:
    """One Work call from a test: `send` requests, `take` responses as they come."""

    def __init__(self, stub: pb_grpc.WorkerServiceStub, metadata: Any = None) -> None:
        self._requests: queue.Queue[pb.WorkRequest | None] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        self.call = stub.Work(self._outgoing(), timeout=60, metadata=metadata)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _outgoing(self) -> Any:
        while (request := self._requests.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for response in self.call:
                self._responses.put(response)
            self._responses.put(ENDED)
        except grpc.RpcError as exc:
            self._responses.put(exc)

    def send(self, **fields: Any) -> None:
        self._requests.put(pb.WorkRequest(**fields))

    def half_close(self) -> None:
        self._requests.put(None)

    def take(self, timeout: float = TAKE_TIMEOUT) -> Any:
        """The next response, ENDED, or the RpcError the call ended with."""
        return self._responses.get(timeout=timeout)

    def nothing_within(self, seconds: float) -> bool:
        try:
            self._responses.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.call.cancel()
        self.half_close()
