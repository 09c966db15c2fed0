"""How a worker process ends: its exit status says whether it stopped or crashed.

The workers are in tests/e2e/misbehaving_workers.py. A supervisor restarts a worker on a
non-zero status (`Restart=on-failure`), so a crash must not exit 0, and a stop asked for
by a signal must come promptly and exit 0 whatever the worker was doing.
"""

from __future__ import annotations

import signal

import pytest
from helpers import conveyor_command, wait_final, wait_for

from conveyor import Task, TaskState

E2E_APPS = "misbehaving_workers"


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
    """An exit from outside any handler still ends the worker's loop: the process says so
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
    assert "crashed: SystemExit: 3" in worker.output()
