"""A worker process asked to stop by SIGTERM, SIGINT or SIGHUP drains, hands back the rest, exits 0.

The worker is `drain_workers:worker` (tests/e2e/drain_workers.py): the usual test handlers
with a 3-second drain timeout. A short task finishes within the drain; a long one is handed
back (RELEASED) and is queued again at once, without spending an attempt and without
waiting for its lease to expire.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from helpers import conveyor_command, server_argv, wait_final, wait_for

from conveyor import Task, TaskState

DRAIN_TIMEOUT = 3.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "times"),
    [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGHUP, 2)],
    ids=["SIGTERM", "SIGINT", "SIGHUP-twice"],
)
def test_signal_drains_short_task_and_hands_back_long_one(
    sig, times, server, client, db, ledger, processes, e2e_pythonpath
):
    """SIGHUP (a closed terminal, which may send it twice) too: before, it killed the
    worker, and its tasks came back lease_expired, each with an attempt spent."""
    worker = processes(
        conveyor_command(
            "worker", "drain_workers:worker", "--server", server.address, "--concurrency", "2"
        ),
        name="drain-worker",
        CONVEYOR_TEST_LEDGER=str(ledger.path),
        PYTHONPATH=e2e_pythonpath,
    )
    short = client.enqueue_task(Task(type="sleep", payload=b"1.5"))
    long = client.enqueue_task(Task(type="sleep", payload=b"60"))
    wait_for(
        lambda: {row["task_id"] for row in ledger.started()} >= {short, long},
        timeout=30,
        what="both tasks to start in the worker",
    )
    worker_id = client.get_task_status(long).worker_id
    assert worker_id is not None

    signalled_at = time.monotonic()
    signalled_wall = time.time()
    for _ in range(times):
        worker.signal(sig)

    # The long task is handed back once the drain timeout is over: queued again, well
    # before its 30-second lease could expire.
    requeued = wait_for(
        lambda: (
            (status := client.get_task_status(long, history=True)).state is TaskState.QUEUED
            and status
        ),
        timeout=15,
        interval=0.05,
        what="the long task to be handed back",
    )
    requeue_delay = time.monotonic() - signalled_at
    assert requeue_delay < DRAIN_TIMEOUT + 2.5, f"handed back only after {requeue_delay:.1f}s"
    assert requeued.attempts == 0
    released = requeued.history[-1]
    assert released.event == "released"
    assert released.state is TaskState.QUEUED
    assert released.worker_id == worker_id
    assert [event.event for event in requeued.history] == ["enqueued", "started", "released"]
    # It was given the drain timeout to finish before being handed back.
    assert released.at.timestamp() - signalled_wall >= DRAIN_TIMEOUT - 0.5

    # The short task finished within the drain.
    done = wait_final(client, short, timeout=10)
    assert done.state is TaskState.SUCCEEDED
    assert done.result == b"slept"
    assert done.attempts == 1

    assert worker.wait(15) == 0, worker.output()
    assert time.monotonic() - signalled_at < 15

    # The ledger: both started once; only the short one ran to its end.
    assert sorted(row["task_id"] for row in ledger.started()) == sorted([short, long])
    assert [row["task_id"] for row in ledger.finished()] == [short]
    assert {row["pid"] for row in ledger.entries()} == {str(worker.pid)}

    state = db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker_id)
    assert state == "stopped"
    # Nothing else picked the long task up meanwhile: it waits for the next worker.
    assert client.get_task_status(long).state is TaskState.QUEUED


def ignored_signals(pid: int) -> set[int]:
    """The signals process `pid` ignores (SIG_IGN), from the kernel's own account."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {sig for sig in range(1, 65) if mask & (1 << (sig - 1))}
    raise AssertionError(f"no SigIgn line for process {pid}")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["worker", "server"])
def test_under_nohup_sighup_stays_ignored_and_sigterm_still_stops(
    command, server, client, database_url, processes
):
    """`nohup conveyor worker ...` stopped at the SIGHUP nohup was to shield it from: the
    stop handlers replaced the signal's inherited SIG_IGN. A signal ignored when the command
    starts now stays ignored, as the kernel reports once the command serves."""
    if command == "worker":
        argv = conveyor_command("worker", "worker_apps:worker", "--server", server.address)
    else:
        argv = conveyor_command(*server_argv(database_url))
    child = processes(["nohup", *argv], name=f"nohup-{command}")  # nohup execs: same pid
    if command == "worker":
        task_id = client.enqueue_task(Task(type="noop"))
        assert wait_final(client, task_id).state is TaskState.SUCCEEDED
    else:
        wait_for(lambda: "Conveyor server" in child.output(), timeout=30, what="the banner")
    ignored = ignored_signals(child.pid)
    assert signal.SIGHUP in ignored
    assert signal.SIGTERM not in ignored
    child.signal(signal.SIGTERM)
    assert child.wait(60) == 0, child.output()
