"""Ctrl-C (KeyboardInterrupt in the main thread) during a blocking Client's unary calls.

A notebook's "interrupt kernel", or a CLI script that catches KeyboardInterrupt and goes on
(to cancel what it enqueued, say), interrupts `Client.get_task_status` on the main thread.
Afterwards the client must still answer.

Here the main thread reads a task's status over and over while SIGINT arrives every few
milliseconds (a few seconds of it: each interrupt is one chance to hit the window); then a
fresh thread makes one call with the client, and the interpreter exits without close().
The call used to never answer: an interrupted call left a lock of gRPC's channel held
(`threading.Condition.__enter__` is Python code, and a KeyboardInterrupt delivered just after
its lock is taken leaves it taken), so every later call on the client's channel blocks on
it forever, past every deadline (seen in grpc/_channel.py `_blocking` ->
`segregated_call`, and `cancel`). On the main thread the client now makes its unary calls
from a thread of their own (sync_client._off_the_main_thread).

The client runs in a fresh interpreter (its main thread takes the signals); a hang fails on
the deadlines below.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

SCRIPT = textwrap.dedent(
    """
    import random, signal, sys, threading, time
    from conveyor import Client, Task

    client = Client(sys.argv[1])
    task_id = client.enqueue_task(Task(type="embedding.interrupted"))  # the stream is open
    # (or, where the server has none, the client now makes its enqueues as unary calls)
    if sys.argv[2] == "get_task_status":
        call = lambda: client.get_task_status(task_id)
    else:
        call = lambda: client.enqueue_task(Task(type="embedding.interrupted"))
    main = threading.main_thread().ident
    stop = threading.Event()
    in_call = False

    def on_sigint(signum, frame):
        # Ctrl-C only inside a call: one landing in this script's own loop (it once hit the
        # `while` line on a loaded CI machine) would test nothing of the client.
        global in_call
        if in_call:
            in_call = False
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)

    def interrupt() -> None:
        rnd = random.Random(1)
        while not stop.is_set():
            time.sleep(rnd.uniform(0.0002, 0.004))
            signal.pthread_kill(main, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt, daemon=True)
    interrupter.start()
    interrupted = answered = 0
    until = time.monotonic() + 8
    while time.monotonic() < until:
        try:
            in_call = True
            call()
            in_call = False
            answered += 1
        except KeyboardInterrupt:
            interrupted += 1
    stop.set()
    while interrupter.is_alive():
        try:
            interrupter.join()
        except KeyboardInterrupt:
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"interrupted {interrupted}, answered {answered}", flush=True)

    outcome = {}
    def probe() -> None:
        try:
            outcome["enqueued"] = bool(client.enqueue_task(Task(type="embedding.interrupted")))
            outcome["state"] = client.get_task_status(task_id).state.name
        except BaseException as exc:
            outcome["error"] = repr(exc)
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    prober.join(15)
    print("after:", outcome or "no answer in 15 s", flush=True)
    # No close(): the interpreter exits with the client open, as a script ends.
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("interrupted_call", "enqueue_stream"),
    [
        ("get_task_status", True),
        ("enqueue_task", True),
        # A server without the enqueue stream: enqueues fall back to the unary EnqueueTasks,
        # which ran on the main thread and, interrupted, hung the later calls as above.
        ("enqueue_task", False),
    ],
    ids=["get_task_status", "enqueue_task", "enqueue_task-unary"],
)
def test_the_client_still_answers_after_interrupted_calls(
    start_server: Any, interrupted_call: str, enqueue_stream: bool
) -> None:
    """get_task_status is a unary call (made from a thread of its own on the main thread);
    enqueue_task goes on the enqueue stream through the group commit, or, where the server
    has none, on the unary call (from a thread of its own too)."""
    server = start_server(enqueue_stream=enqueue_stream)
    try:
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT, server.address, interrupted_call],
            capture_output=True,
            text=True,
            timeout=45,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(f"the process never exited; it said: {out!r}") from None
    assert "interrupted 0," not in result.stdout, "no call was interrupted: nothing was tested"
    assert "after: {'enqueued': True, 'state': 'QUEUED'}" in result.stdout, (
        result.stdout + result.stderr[-2000:]
    )
    assert result.returncode == 0, result.stderr[-2000:]
