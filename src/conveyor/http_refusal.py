"""The 503 answer an HTTP endpoint writes to a connection past its cap, before closing it.

The server's HTTP addresses (monitoring/http.py) and a worker's metrics endpoint
(worker/metrics.py) each cap their connections and refuse the one past the cap without
reading from it: this leaf module owns that answer, so that both refuse alike (the worker
layer may not import monitoring). The body is JSON, as the server's other refusals are.
"""

from __future__ import annotations

import json


def connection_refusal(message: str) -> bytes:
    """The whole answer: 503, `Retry-After: 1`, `Connection: close` and a JSON body.

    The body is `{"error": "unavailable", "message": message}`.
    """
    body = json.dumps({"error": "unavailable", "message": message}).encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Retry-After: 1\r\n"
        b"Connection: close\r\n\r\n" + body
    )
