"""How a `conveyor worker` process ends, and where its tasks end.

Covered here: the CLI's exit path with a sync
handler that ignores its cancellation (`os._exit(0)` after the drain), and handlers that
kill their own process (a segfault, `os._exit`): their tasks must come back, once.
"""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path

import pytest
from helpers import conveyor_command, wait_for

from conveyor import Client, Task, TaskState

APP = textwrap.dedent(
    """
    import ctypes, os, sys, threading
    from datetime import timedelta
    from conveyor import Worker

    worker = Worker(concurrency=2, drain_timeout=timedelta(seconds=2))

    def note(what):
        sys.stdout.write(what + "\\n")
        sys.stdout.flush()

    @worker.handler("stuck")
    def stuck(ctx, payload):
        note("stuck handler started")
        threading.Event().wait()  # ignores ctx.cancelled, never returns

    @worker.handler("segfault")
    def segfault(ctx, payload):
        if ctx.attempt == 1:
            ctypes.string_at(0)
        return b"survived"

    @worker.handler("hard_exit")
    def hard_exit(ctx, payload):
        if ctx.attempt == 1:
            os._exit(0)
        return b"survived"

    @worker.handler("quick")
    def quick(ctx, payload):
        return b"ok"
    """
)


def active_workers(db) -> int:
    return db.fetchval("SELECT count(*) FROM conveyor_workers WHERE state = 'active'")


def spawn_app(processes, tmp_path: Path, address: str, name: str):
    (tmp_path / "review_exit_app.py").write_text(APP)
    return processes(
        conveyor_command("worker", "review_exit_app:worker", "--server", address),
        name=name,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_sigterm_with_a_stuck_sync_handler_exits_0_and_hands_its_task_back(
    server, client, db, processes, tmp_path
):
    worker = spawn_app(processes, tmp_path, server.address, "stuck")
    wait_for(lambda: active_workers(db) == 1, timeout=30, what="the worker to register")
    task_id = client.enqueue_task(Task(type="stuck"))
    wait_for(lambda: "stuck handler started" in worker.output(), timeout=30, what="the handler")
    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()
    # drain 2 s + 1 s for the handler to give up + the goodbye.
    assert time.monotonic() - signalled < 8, worker.output()
    assert "1 sync handler(s) still running" in worker.output()
    status = client.get_task_status(task_id, history=True)
    assert status.state is TaskState.QUEUED
    assert status.attempts == 0
    assert [e.event for e in status.history] == ["enqueued", "started", "released"]
    assert db.fetchval("SELECT state FROM conveyor_workers") == "stopped"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["segfault", "hard_exit"])
def test_a_handler_that_kills_its_process_loses_no_task(
    kind, server, client, db, processes, tmp_path
):
    worker = spawn_app(processes, tmp_path, server.address, "dying")
    wait_for(lambda: active_workers(db) == 1, timeout=30, what="the worker to register")
    task_id = client.enqueue_task(Task(type=kind, max_retries=2))
    code = worker.wait(30)
    assert code == (-signal.SIGSEGV if kind == "segfault" else 0), worker.output()
    spawn_app(processes, tmp_path, server.address, "next")
    status = wait_for(
        lambda: (s := client.get_task_status(task_id, history=True)).state.is_final and s,
        timeout=90,
        what="the task to finish on the next worker",
    )
    assert status.state is TaskState.SUCCEEDED, status
    assert status.attempts == 2
    events = [e.event for e in status.history]
    assert events == ["enqueued", "started", "lease_expired", "started", "succeeded"], events


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_with_the_server_gone_exits_0_within_the_documented_bound(
    start_server, db, processes, tmp_path
):
    """Worker.stop() waits at most drain_timeout + 30 s (architecture.md): with no server to
    hand back to, the process still exits 0 within that."""
    server = start_server()
    worker = spawn_app(processes, tmp_path, server.address, "orphan")
    wait_for(lambda: active_workers(db) == 1, timeout=30, what="the worker to register")
    with Client(server.address) as client:
        client.enqueue_task(Task(type="stuck"))
    wait_for(lambda: "stuck handler started" in worker.output(), timeout=30, what="the handler")
    server.stop()
    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.output()
    assert time.monotonic() - signalled < 2 + 30, worker.output()
