"""Worker processes die, freeze and come back: their tasks are recovered, fenced, never lost.

Quick server settings (faults/cluster.py): lease 4 s, heartbeats every 0.5 s, a worker
silent for 2 s is marked lost and its leases end at once (the sweeper), reaper every 0.2 s.
"""

from __future__ import annotations

import signal
import time

import pytest
from faults.cluster import LEASE_TTL, WORKER_LOST_AFTER, real_pid, signal_process
from helpers import RERUN_AFTER_LEASE_EXPIRED, wait_final, wait_for

from conveyor import Task, TaskState

# Sweeper (2 s of silence) + a reaper round + the retry backoff + a claim, with some slack;
# in any case no later than the lease itself would expire.
RECOVERY_BOUND = LEASE_TTL + 1.0


def kill(worker) -> float:
    """SIGKILL a worker process by PID; return the wall-clock time of the kill."""
    killed_at = time.time()
    signal_process(worker, signal.SIGKILL)
    worker.wait(10)
    return killed_at


@pytest.mark.slow
def test_kill_worker_mid_task(cluster):
    """kill -9 the worker running a task: it is back within the lease and completes elsewhere."""
    server = cluster.server()
    workers = [cluster.worker(server, concurrency=1) for _ in range(2)]
    cluster.wait_registered(*workers)
    client = cluster.client(server)

    task_id = cluster.enqueue_one(client, Task(type="sleep", payload=b"2"))
    first = cluster.wait_starts(task_id)[0]
    victim = cluster.worker_by_pid(first["pid"])
    survivor = next(w for w in workers if w is not victim)
    victim_id = cluster.worker_id(victim)

    killed_at = kill(victim)
    rerun = cluster.wait_starts(task_id, 2, timeout=RECOVERY_BOUND + 5)[1]
    recovery = float(rerun["at"]) - killed_at
    cluster.record_recovery(recovery)
    assert recovery < RECOVERY_BOUND, f"the task was back only after {recovery:.2f}s"
    assert int(rerun["pid"]) == survivor.pid
    assert rerun["attempt"] == "2"

    status = wait_final(client, task_id, timeout=10)
    assert status.state is TaskState.SUCCEEDED
    assert status.result == b"slept"
    assert [e.event for e in status.history] == RERUN_AFTER_LEASE_EXPIRED
    expired = status.history[2]
    assert (expired.attempt, expired.worker_id) == (1, victim_id)
    assert "stopped renewing its lease" in (expired.detail or "")
    assert status.worker_id == cluster.worker_id(survivor)
    # The victim was marked lost by the sweeper (which is what ended its lease early).
    assert db_state(cluster, victim_id) == "lost"


def db_state(cluster, worker_id: str) -> str:
    return str(cluster.db.fetchval("SELECT state FROM conveyor_workers WHERE id = $1", worker_id))


@pytest.mark.slow
def test_kill_worker_holding_a_batch_of_leases(cluster):
    """kill -9 a worker holding 8 leases at once: all 8 tasks complete on another worker."""
    server = cluster.server()
    holder = cluster.worker(server, concurrency=8, name="holder")
    cluster.wait_registered(holder)
    client = cluster.client(server)

    ids = cluster.enqueue(client, [Task(type="sleep", payload=b"3") for _ in range(8)])
    wait_for(
        lambda: len({r["task_id"] for r in cluster.ledger.started()}) == 8,
        timeout=10,
        what="the holder to start all 8 tasks",
    )
    assert {r["pid"] for r in cluster.ledger.started()} == {str(holder.pid)}
    # The second worker registers only now, so the holder leased the whole batch.
    rescuer = cluster.worker(server, concurrency=8, name="rescuer")
    cluster.wait_registered(rescuer)
    assert all(cluster.state(task_id) == "running" for task_id in ids)

    killed_at = kill(holder)
    reruns = [cluster.wait_starts(task_id, 2, timeout=RECOVERY_BOUND + 5)[1] for task_id in ids]
    recovery = max(float(r["at"]) for r in reruns) - killed_at
    cluster.record_recovery(recovery)
    assert recovery < RECOVERY_BOUND, f"the last task was back only after {recovery:.2f}s"
    assert {r["pid"] for r in reruns} == {str(rescuer.pid)}

    finals = [wait_final(client, task_id, timeout=15) for task_id in ids]
    assert [s.state for s in finals] == [TaskState.SUCCEEDED] * 8
    for status in finals:
        assert [e.event for e in status.history] == RERUN_AFTER_LEASE_EXPIRED
    assert len(cluster.ledger.started()) == 16
    assert {r["pid"] for r in cluster.ledger.finished()} == {str(rescuer.pid)}


@pytest.mark.slow
def test_sigstop_worker_past_its_lease(cluster):
    """A worker frozen past its lease (SIGSTOP) and resumed (SIGCONT) is a fenced zombie.

    The zombie holds two tasks: `short` (2 s), whose handler is already due when the process
    resumes, so it finishes and reports a late success that must be refused; and `long`
    (7 s), still running at the resume, which the next heartbeat must stop (lease lost).
    Both were re-run by the other worker meanwhile; each ends with exactly one 'succeeded',
    the other worker's.
    """
    pause = LEASE_TTL + 1.0
    server = cluster.server()
    zombie = cluster.worker(server, concurrency=2, name="zombie")
    cluster.wait_registered(zombie)
    client = cluster.client(server)
    short = cluster.enqueue_one(client, Task(type="sleep", payload=b"3"))
    long = cluster.enqueue_one(client, Task(type="sleep", payload=b"8"))
    cluster.wait_starts(short)
    cluster.wait_starts(long)
    other = cluster.worker(server, concurrency=2, name="other")
    cluster.wait_registered(other)

    stopped_at = time.monotonic()
    signal_process(zombie, signal.SIGSTOP)
    assert not cluster.ledger.finished(), "the zombie finished a task before it was frozen"
    # While it is frozen, the sweeper marks it lost and the other worker re-runs both.
    for task_id in (short, long):
        rerun = cluster.wait_starts(task_id, 2, timeout=RECOVERY_BOUND + 5)[1]
        assert int(rerun["pid"]) == other.pid
    cluster.record_recovery(time.monotonic() - stopped_at)
    # The fault itself: frozen for longer than a whole lease.
    time.sleep(max(0.0, stopped_at + pause - time.monotonic()))
    signal_process(zombie, signal.SIGCONT)

    # The late success of `short` is refused by fencing ...
    wait_for(
        lambda: "outcome refused, the lease is no longer ours" in zombie.output(),
        timeout=10,
        what="the zombie's late report to be refused",
    )
    refused = server.metric("conveyor_stale_completions_rejected_total")
    assert refused is not None
    assert refused >= 1
    # ... and the heartbeat answers that the lease of `long` is lost, which stops it.
    wait_for(
        lambda: f"stopping task {long}: its lease was lost" in zombie.output(),
        timeout=10,
        what="the zombie to stop its long task",
    )

    other_id = cluster.worker_id(other)
    for task_id in (short, long):
        status = wait_final(client, task_id, timeout=15)
        assert status.state is TaskState.SUCCEEDED
        events = [e.event for e in status.history]
        assert events == RERUN_AFTER_LEASE_EXPIRED
        assert status.worker_id == other_id
        assert status.history[-1].worker_id == other_id
        runs = cluster.starts(task_id)
        assert [int(r["pid"]) for r in runs] == [zombie.pid, other.pid]
    # The zombie really finished `short` (its late completion), not `long`.
    ends = cluster.ledger.finished()
    assert sorted(int(r["pid"]) for r in ends if r["task_id"] == short) == sorted(
        [zombie.pid, other.pid]
    )
    assert [int(r["pid"]) for r in ends if r["task_id"] == long] == [other.pid]
    # The zombie is alive and well again: its heartbeats revived it.
    wait_for(
        lambda: db_state(cluster, cluster.worker_id(zombie)) == "active",
        timeout=5,
        what="the zombie to be active again",
    )


@pytest.mark.slow
def test_cancel_while_lease_is_recovered(cluster):
    """Cancel tasks of a killed worker before and after the reaper requeues them.

    `early` is cancelled right after the kill, while it still holds the dead worker's lease;
    `late` once the reaper has put it back in the queue (no other worker exists yet). Both
    stay cancelled: a new worker then runs a sentinel task enqueued after them (FIFO: it
    would have taken them first), and neither ever runs again.
    """
    server = cluster.server()
    victim = cluster.worker(server, concurrency=2, name="victim")
    cluster.wait_registered(victim)
    client = cluster.client(server)
    early = cluster.enqueue_one(client, Task(type="sleep", payload=b"30"))
    late = cluster.enqueue_one(client, Task(type="sleep", payload=b"30"))
    cluster.wait_starts(early)
    cluster.wait_starts(late)
    victim_id = cluster.worker_id(victim)

    killed_at = time.monotonic()
    kill(victim)
    cancelled = client.cancel_task(early)
    assert cancelled.state is TaskState.CANCELLED

    # Scheduled for its retry, or already back in the queue (publicly QUEUED either way).
    cluster.wait_state(late, "queued", "scheduled", timeout=WORKER_LOST_AFTER + 5)
    cluster.record_recovery(time.monotonic() - killed_at)
    assert client.cancel_task(late).state is TaskState.CANCELLED
    assert db_state(cluster, victim_id) == "lost"

    survivor = cluster.worker(server, concurrency=2, name="survivor")
    cluster.wait_registered(survivor)
    sentinel = cluster.enqueue_one(client, Task(type="noop", payload=b"sentinel"))
    assert wait_final(client, sentinel, timeout=10).state is TaskState.SUCCEEDED

    early_status = client.get_task_status(early, history=True)
    late_status = client.get_task_status(late, history=True)
    assert early_status.state is TaskState.CANCELLED
    assert late_status.state is TaskState.CANCELLED
    assert [e.event for e in early_status.history] == ["enqueued", "started", "cancelled"]
    assert "its lease is revoked" in (early_status.history[-1].detail or "")
    assert [e.event for e in late_status.history] == [
        "enqueued",
        "started",
        "lease_expired",
        "cancelled",
    ]
    assert late_status.history[-1].detail == "cancelled while queued"
    # Each ran exactly once, on the victim; the survivor ran only the sentinel.
    for task_id in (early, late):
        assert [int(r["pid"]) for r in cluster.starts(task_id)] == [real_pid(victim.pid)]
    assert [r["task_id"] for r in cluster.ledger.started() if int(r["pid"]) == survivor.pid] == [
        sentinel
    ]
