"""`Client.close()` in a forked child returns, whatever a thread of the parent held.

Every enqueue attempt takes the client's `_channels_lock` (to find, or create, its
address's stream). A process that forks while another of its threads holds it gives the
child a copy of the lock that no thread there will release. `close()` used to take it
before seeing it ran in a forked child, and waited for ever there (an atexit hook, a
`with Client(...)` block ending in the child, a prefork server's shutdown hook), although
it promises only to mark the child's copy closed.

The window is made wide by slowing the creation of the enqueue stream, which runs under
the lock, in the parent; the real one is that creation, or the look-up every attempt makes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

from helpers import wait_for

from conveyor import Client, Task
from conveyor.client import sync_client

CHILD_DEADLINE = 5.0


def test_close_in_a_forked_child_returns_even_if_a_parent_thread_held_the_lock(
    server: Any, monkeypatch: Any
) -> None:
    creating = threading.Event()
    go_on = threading.Event()
    real_stream = sync_client.BlockingEnqueueStream

    class SlowToCreate(real_stream):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            creating.set()
            go_on.wait(30)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sync_client, "BlockingEnqueueStream", SlowToCreate)
    client = Client(server.address)
    enqueued: list[object] = []
    producer = threading.Thread(
        target=lambda: enqueued.append(client.enqueue_task(Task(type="fork.close"))),
        daemon=True,
    )
    producer.start()
    # The producer is inside Client._enqueue_once, holding client._channels_lock.
    wait_for(creating.is_set, what="the producer creating its stream under the lock")

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its copy of the lock is held by a thread it does not have
        try:
            os.close(read_end)
            client.close()
            os.write(write_end, b"closed")
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        deadline = time.monotonic() + CHILD_DEADLINE
        exited = False
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                exited = True
                break
            time.sleep(0.02)
        with os.fdopen(read_end, "rb") as pipe:
            said = pipe.read().decode() if exited else ""
    finally:
        if not exited:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        go_on.set()
        producer.join(30)
        client.close()
    assert exited, (
        f"close() in the forked child did not return within {CHILD_DEADLINE}s "
        "(blocked on the Client's _channels_lock, held in the parent at fork time)"
    )
    assert said == "closed"
    assert len(enqueued) == 1  # the parent's enqueue went through once released


# The window is made wide as in the test above: a thread of the parent holds the stream's
# call's lock (grpc's own threads take it as the call runs) while the main thread forks.
EXIT_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    from conveyor import Client, Task

    ADDRESS, DEADLINE = sys.argv[1], float(sys.argv[2])
    client = Client(ADDRESS)
    client.enqueue_task(Task(type="fork.exit"))  # the client now holds an open stream
    (stream,) = client._enqueue_streams.values()
    holding, release = threading.Event(), threading.Event()

    def hold_the_calls_lock() -> None:
        with stream._call._state.condition:
            holding.set()
            release.wait(60)

    threading.Thread(target=hold_the_calls_lock, daemon=True).start()
    holding.wait(60)
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # an ordinary exit: atexit hooks and the client's finalizer run
    release.set()
    deadline = time.monotonic() + DEADLINE
    while os.waitpid(pid, os.WNOHANG)[0] != pid:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            print("the child hung")
            break
        time.sleep(0.01)
    else:
        print("the child exited")
    client.close()
    """
)


def test_a_forked_child_exits_although_the_parent_client_holds_a_stream(server: Any) -> None:
    """A forked child's exit ran the client's finalizer, which cancelled the parent's call
    with gRPC state whose threads the child lacks: about one exit in forty hung for ever in
    a review, and every one whose fork came while a thread of the parent held the call."""
    result = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, server.address, str(CHILD_DEADLINE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "the child exited", result.stderr
