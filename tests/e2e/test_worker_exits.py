"""How a worker process ends: its exit status says whether it stopped or crashed.

The workers are in tests/e2e/misbehaving_workers.py. A supervisor restarts a worker on a
non-zero status (`Restart=on-failure`), so a crash must not exit 0, and a stop asked for
by a signal must come promptly and exit 0 whatever the worker was doing.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    conveyor_command,
    free_port,
    signal_a_thread_other_than_main,
    wait_final,
    wait_for,
)

from conveyor import Task, TaskState

E2E_APPS = "misbehaving_workers"
E2E_DIR = Path(__file__).parent


def active_workers(db) -> int:
    return db.fetchval("SELECT count(*) FROM conveyor_workers WHERE state = 'active'")


@pytest.mark.slow
def test_an_async_handler_calling_sys_exit_fails_its_task_and_the_worker_runs_on(
    server, client, db, processes, e2e_pythonpath
):
    worker = processes(
        conveyor_command("worker", f"{E2E_APPS}:exiting", "--server", server.address),
        name="exiting-worker",
        PYTHONPATH=e2e_pythonpath,
    )
    wait_for(lambda: active_workers(db) == 1, timeout=30, what="the worker to register")
    bad = wait_final(client, client.enqueue_task(Task(type="parse", payload=b"--n nan")))
    good = wait_final(client, client.enqueue_task(Task(type="parse", payload=b"--n 7")))
    assert (bad.state, bad.last_error) == (TaskState.FAILED, "SystemExit: 2")
    assert (good.state, good.result) == (TaskState.SUCCEEDED, b"7")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()


@pytest.mark.slow
def test_a_crashed_worker_exits_with_status_1(server, client, db, processes, e2e_pythonpath):
    """A handler that stops the worker's event loop ends the worker: the process says so
    with status 1 and one error line (it exited 0, and supervisors did not restart it)."""
    worker = processes(
        conveyor_command("worker", f"{E2E_APPS}:exiting", "--server", server.address),
        name="crashing-worker",
        PYTHONPATH=e2e_pythonpath,
    )
    wait_for(lambda: active_workers(db) == 1, timeout=30, what="the worker to register")
    client.enqueue_task(Task(type="crash"))
    assert worker.wait(30) == 1, worker.output()
    assert "error: worker " in worker.output()
    assert "crashed: RuntimeError: Event loop stopped before Future completed." in worker.output()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "times"), [(signal.SIGTERM, 1), (signal.SIGHUP, 2)], ids=["SIGTERM", "SIGHUP-twice"]
)
def test_a_program_running_a_worker_exits_after_the_drain_without_a_stuck_sync_handler(
    sig, times, server, client, processes, e2e_pythonpath
):
    """`worker.run()` embedded in a program: its handler never returns and ignores its
    cancellation. run() returns after the drain, and the program exits with it (the
    handler's thread was joined at interpreter exit, so it never exited). SIGHUP, twice as
    a closed terminal may send it, drains too: it used to kill the program, and the task
    came back lease_expired with an attempt spent."""
    program = processes(
        [sys.executable, str(E2E_DIR / f"{E2E_APPS}.py"), server.address],
        name="embedded-worker",
        PYTHONPATH=e2e_pythonpath,
    )
    task_id = client.enqueue_task(Task(type="stuck"))
    wait_for(lambda: "handler started" in program.output(), timeout=30, what="the handler")
    for _ in range(times):
        program.signal(sig)
    assert program.wait(15) == 0, program.output()
    assert "run() returned; busy_threads = 1" in program.output()
    # Handed back at the drain, attempt unspent.
    status = client.get_task_status(task_id, history=True)
    assert [event.event for event in status.history] == ["enqueued", "started", "released"]


def to_the_process(worker: Any, sig: int) -> str:
    """Signal the process, as kill(1) does (the kernel mostly picks its main thread)."""
    worker.signal(sig)
    return "the process"


def to_another_thread(worker: Any, sig: int) -> str:
    """Signal one of its other threads, which the kernel may also pick."""
    return f"thread {signal_a_thread_other_than_main(worker.pid, sig)!r}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "send"),
    [
        (signal.SIGTERM, to_the_process),
        (signal.SIGINT, to_the_process),
        (signal.SIGINT, to_another_thread),
    ],
    ids=["SIGTERM", "SIGINT", "SIGINT-to-another-thread"],
)
def test_a_signal_while_no_server_accepts_the_worker_stops_it_at_once(
    sig, send, processes, e2e_pythonpath
):
    """The signal was only noted until start() gave up: the worker went on retrying its
    registration for its whole 30 s, past an orchestrator's grace period, and exited 1.
    Later, caught by another thread, it went unseen the same way: Python runs signal
    handlers in the main thread only, and start() blocked it with no timeout."""
    worker = processes(
        conveyor_command("worker", f"{E2E_APPS}:exiting", "--server", f"127.0.0.1:{free_port()}"),
        name="unregistered-worker",
        PYTHONPATH=e2e_pythonpath,
    )
    wait_for(
        lambda: "no server accepted the worker yet" in worker.output(),
        timeout=30,
        what="the worker to retry its registration",
    )
    signalled_at = time.monotonic()
    receiver = send(worker, sig)
    assert worker.wait(15) == 0, f"signalled {receiver}\n{worker.output()}"
    assert time.monotonic() - signalled_at < 5, worker.output()
    assert "stopped before any server accepted the worker" in worker.output()


@pytest.mark.slow
def test_a_second_signal_caught_by_another_thread_during_the_drain_exits_at_once(
    server, client, ledger, processes, e2e_pythonpath
):
    """The drain's wait blocked the main thread the same way: a second signal caught by
    another thread waited for the drain to end, where it promises to exit at once."""
    worker = processes(
        conveyor_command("worker", "drain_workers:worker", "--server", server.address),
        name="draining-worker",
        CONVEYOR_TEST_LEDGER=str(ledger.path),
        PYTHONPATH=e2e_pythonpath,
    )
    long = client.enqueue_task(Task(type="sleep", payload=b"60"))
    wait_for(
        lambda: long in {row["task_id"] for row in ledger.started()},
        timeout=30,
        what="the task to start",
    )
    worker.signal(signal.SIGTERM)
    wait_for(lambda: "stopping gracefully" in worker.output(), timeout=10, what="the drain")
    signalled_at = time.monotonic()
    signal_a_thread_other_than_main(worker.pid, signal.SIGTERM)
    # Status 1 is the exit at once; the drain (3 s) would have ended it with 0.
    assert worker.wait(15) == 1, worker.output()
    assert time.monotonic() - signalled_at < 2, worker.output()
    assert "second signal: exiting without draining" in worker.output()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_while_the_module_imports_exits_0(sig, processes, tmp_path):
    """An application's imports can take seconds. A stop signal then ended the command by
    the signal's default action (143, 129): a supervisor took that for a crash."""
    (tmp_path / "slow_app.py").write_text(
        "import sys, time\n"
        "print('importing', flush=True)\n"
        "time.sleep(60)  # an application's slow imports\n"
    )
    worker = processes(
        conveyor_command("worker", "slow_app:worker", "--server", f"127.0.0.1:{free_port()}"),
        name="slow-import-worker",
        cwd=tmp_path,
    )
    wait_for(lambda: "importing" in worker.output(), timeout=30, what="the module to import")
    worker.signal(sig)
    assert worker.wait(15) == 0, worker.output()
    assert "while loading slow_app:worker" in worker.output()
