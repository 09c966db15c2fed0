"""The size of one gRPC message that every Conveyor client and worker accepts.

Clients and workers receive and send messages of up to `PEER_MESSAGE_BYTES`. A server sizes
its own limit from its payload limit (`ServerConfig.max_message_bytes`), and a message it
sends a worker must fit in the worker's limit too, so the server's payload limit is bounded
by this (`ServerConfig` refuses a larger one).
"""

from __future__ import annotations

from typing import Final

PEER_MESSAGE_BYTES: Final = 64 * 1024 * 1024
