"""Raw bidirectional streams driven from a test thread.

`RawStream` is one `Work` call (see tests/integration/test_work_stream.py) and
`RawEnqueueStream` one `EnqueueStream` call (tests/integration/test_enqueue_stream.py).
Both send requests as the test makes them and collect responses on a reader thread, so a
test can wait for each with a deadline and see how the call ended. `RawCall` is what they
share, for a call opened some other way (unencoded bytes, say).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

ENDED = object()  # what `take` gives once the call has ended OK
TAKE_TIMEOUT = 10.0
CALL_TIMEOUT = 60.0


class RawCall:
    """One bidirectional call: `put` requests, `take` responses as they come.

    `open_call` gets the iterator of requests and returns the call (a response iterator).
    """

    def __init__(self, open_call: Callable[[Iterator[Any]], Any], *, reading: bool = True) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        self.call = open_call(self._outgoing())
        self._reader = threading.Thread(target=self._read, daemon=True)
        if reading:
            self._reader.start()

    def start_reading(self) -> None:
        """Begin taking responses off the call (for a call opened with `reading=False`).

        Until then nothing is read, so a server's write larger than the channel's HTTP/2
        window stays in flight: how a test holds a server in the middle of a write.
        """
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

    def put(self, request: Any) -> None:
        """Send one request, as it is (a message, or bytes on a call without a serializer)."""
        self._requests.put(request)

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


class RawStream(RawCall):
    """One Work call from a test: `send` requests, `take` responses as they come."""

    def __init__(
        self, stub: pb_grpc.WorkerServiceStub, metadata: Any = None, *, reading: bool = True
    ) -> None:
        super().__init__(
            lambda requests: stub.Work(requests, timeout=CALL_TIMEOUT, metadata=metadata),
            reading=reading,
        )

    def send(self, **fields: Any) -> None:
        self.put(pb.WorkRequest(**fields))


class RawEnqueueStream(RawCall):
    """One EnqueueStream call from a test: numbered EnqueueTasks requests, their answers."""

    def __init__(self, stub: pb_grpc.TaskServiceStub, metadata: Any = None) -> None:
        super().__init__(
            lambda requests: stub.EnqueueStream(requests, timeout=CALL_TIMEOUT, metadata=metadata)
        )

    def send(self, request_id: int, request: pb.EnqueueTasksRequest) -> None:
        self.put(pb.EnqueueStreamRequest(request_id=request_id, request=request))
