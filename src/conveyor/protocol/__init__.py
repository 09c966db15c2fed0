"""The gRPC wire contract (`v1/conveyor.proto`), its generated code, and the hand-written glue."""

from typing import Final

# The initial metadata key a server sends when it accepts an EnqueueStream call: a client
# writes nothing on the stream before it has seen it (client/enqueue_stream.py says why).
ENQUEUE_STREAM_ACCEPTED: Final = "conveyor-enqueue-stream"
