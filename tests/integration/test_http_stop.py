"""A client stalling mid-request does not hold up the server's stop.

`HttpServer.stop` runs aiohttp's `AppRunner.cleanup()`, which waits for every request in
progress to finish before the connections still open are closed. It waited aiohttp's
default 60 s: a request whose body never arrives (or whose unread body aiohttp lingers
over) is "in progress" until the answer timeout (30 s) or aiohttp's lingering time (10 s)
cuts it off, and one client held a SIGTERM'd server that long, past a typical termination
grace period. The stop now gives requests HTTP_STOP_GRACE (2 s) at most.
"""

from __future__ import annotations

import socket
import time

import pytest
from helpers import wait_for

STALLS = {
    # A dashboard action whose form body says 1000 bytes and sends 7: the handler waits
    # in request.post().
    "half_a_form": (
        b"POST /ui/types/pause HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
        b"type=ab"
    ),
    # A probe with a body it never sends: answered at once, then aiohttp lingers over the
    # body it announced.
    "get_with_an_unsent_body": (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\nab"
    ),
}
# gRPC's grace in the test servers is 2 s; everything else stops in well under a second.
STOP_BUDGET = 8.0


@pytest.mark.parametrize("stall", sorted(STALLS))
def test_a_stalled_request_does_not_hold_up_the_stop(start_server, stall) -> None:
    server = start_server()
    http = server.server._http
    sock = socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10)
    try:
        sock.sendall(STALLS[stall])
        wait_for(lambda: http.open_connections == 1, what="the connection to be open")
        if stall == "half_a_form":
            wait_for(lambda: http.busy_connections == 1, what="the request to be in progress")
        else:
            # The answer arrives; the connection stays open while aiohttp lingers.
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        server.stop()
        took = time.monotonic() - started
        assert took < STOP_BUDGET, f"one stalled HTTP client held the server's stop {took:.1f}s"
    finally:
        sock.close()
