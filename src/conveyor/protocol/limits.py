"""Limits that both ends of a call must agree on: message bytes, leases per heartbeat.

Clients and workers receive and send messages of up to `PEER_MESSAGE_BYTES`. A server sizes
its own limit from its payload limit (`ServerConfig.max_message_bytes`), and a message it
sends a worker must fit in the worker's limit too, so the server's payload limit is bounded
by this (`ServerConfig` refuses a larger one).

A heartbeat names at most `MAX_HEARTBEAT_LEASES` leases: the server refuses more, since
each is a locked row on the pool heartbeats share with leader elections, and a worker
holding more splits its beat into several calls.
"""

from __future__ import annotations

from typing import Final

PEER_MESSAGE_BYTES: Final = 64 * 1024 * 1024
MAX_HEARTBEAT_LEASES: Final = 10_000
