"""start(timeout) gives up within its timeout, also when the server never answers.

A server that accepts the connection and then says nothing (a hung process, a blackholed
link) holds the registration call for its whole deadline, the worker's call_timeout (10 s
by default, up to an hour), and `register` only looks at start's timeout between calls:
`start(timeout=1)` returned after call_timeout instead.

Found by a review: each registration call now gets what is left of start's timeout.
"""

from __future__ import annotations

import socket
import time

import pytest

from conveyor import Worker
from conveyor.errors import ServerUnavailable


def test_start_gives_up_within_its_timeout_on_a_silent_server() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # never accepted: the kernel completes the handshake, nobody speaks
    port = silent.getsockname()[1]
    worker = Worker(f"127.0.0.1:{port}", call_timeout=30)
    worker.register_handler("mine", lambda _ctx, _payload: None)
    began = time.monotonic()
    try:
        with pytest.raises(ServerUnavailable):
            worker.start(timeout=1)
        took = time.monotonic() - began
    finally:
        worker.stop()
        silent.close()
    assert took < 10, f"start(timeout=1) took {took:.1f}s"
