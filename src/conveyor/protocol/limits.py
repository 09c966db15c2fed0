"""Limits that both ends of a call must agree on: message bytes, leases per heartbeat.

Clients and workers receive and send messages of up to `PEER_MESSAGE_BYTES`. A server sizes
its own limit from its payload limit (`ServerConfig.max_message_bytes`), never below
`MIN_SERVER_MESSAGE_BYTES`, and a message it sends a worker must fit in the worker's limit
too, so the server's payload limit is bounded by this (`ServerConfig` refuses a larger one).
A client or worker does not know a given server's limit, only that it is at least
`MIN_SERVER_MESSAGE_BYTES`: requests that join many items (enqueues, outcome reports) are
cut well below it.

A page of the workers listing (ListWorkers) holds `DEFAULT_WORKERS_PER_PAGE` workers
unless the caller asks for another number, and at most `MAX_WORKERS_PER_PAGE`.

A heartbeat names at most `MAX_HEARTBEAT_LEASES` leases: the server refuses more, since
each is a locked row on the pool heartbeats share with leader elections, and a worker
holding more splits its beat into several calls.

A task's trace context (the producer's W3C `traceparent` and `tracestate`, stored with the
task and sent with each lease) has at most `MAX_TRACE_ENTRIES` entries, keys up to
`MAX_TRACE_KEY` characters and values up to `MAX_TRACE_VALUE`, which is W3C's own bound
for `tracestate` (a client trims a longer one as W3C says, rather than fail the enqueue).

A TCP port is at most `MAX_PORT`. gRPC and asyncpg both take a larger one modulo 65,536 and
dial someone else's port, so a client's server addresses, a server's database URL and its
listen addresses are checked against this one bound before anything connects or listens.

A client's or a worker's own deadline for one call (their `call_timeout`) is at most
`LONGEST_CALL_TIMEOUT`: a call unanswered for an hour is lost anyway.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

PEER_MESSAGE_BYTES: Final = 64 * 1024 * 1024
MIN_SERVER_MESSAGE_BYTES: Final = 16 * 1024 * 1024
MAX_HEARTBEAT_LEASES: Final = 10_000
# W3C trace context needs two entries (traceparent, tracestate); room for a few more.
MAX_TRACE_ENTRIES: Final = 8
MAX_TRACE_KEY: Final = 64
MAX_TRACE_VALUE: Final = 512
DEFAULT_WORKERS_PER_PAGE: Final = 500
MAX_WORKERS_PER_PAGE: Final = 10_000
MAX_PORT: Final = 65_535
LONGEST_CALL_TIMEOUT: Final = timedelta(hours=1)
