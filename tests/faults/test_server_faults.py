"""Server processes crash at the worst moments, and leaders die or freeze.

Crashes at exact points use the server's failpoints (conveyor/server/failpoints.py): with
CONVEYOR_FAILPOINTS=lease.after_claim the server SIGKILLs itself after a claim committed and
before the reply left; with enqueue.after_commit, after an enqueue committed and before
its reply. Leadership: --leader-ttl 3, so a dead leader is replaced within 3 s plus one
campaign interval (0.75 s).
"""

from __future__ import annotations

import signal
import time

import pytest
from faults.cluster import LEADER_TTL, LEASE_TTL, signal_process
from helpers import RERUN_AFTER_LEASE_EXPIRED, wait_final, wait_for

from conveyor import Task, TaskState

# A follower campaigns every leader_ttl / 4 (0.75 s): it takes over at most that long after
# the dead leader's lease ran out. Plus slack for a loaded machine.
TAKEOVER_BOUND = LEADER_TTL + LEADER_TTL / 4 + 1.5


def wait_exit(server, *, timeout: float = 15.0) -> int:
    """Wait until the server's process has exited; return its exit status."""
    process = server.process.process
    wait_for(lambda: process.poll() is not None, timeout=timeout, what=f"{server.name} to die")
    return int(process.returncode)


@pytest.mark.slow
def test_server_killed_between_claim_and_reply(cluster):
    """The claim commits, the server dies before replying: the task is not lost.

    Server A dies at the failpoint `lease.after_claim`; the worker, which knows "A,B",
    moves to B. The undelivered lease expires (nobody renews it) and the reaper, on B, puts
    the task back; the worker runs it through B.
    """
    a = cluster.server(name="A", CONVEYOR_FAILPOINTS="lease.after_claim")
    b = cluster.server(name="B", start=False)
    # B is not running yet, so the worker registers with (and long-polls) A.
    worker = cluster.worker(a, b, concurrency=1)
    cluster.wait_registered(worker)
    b.start()
    client = cluster.client(b)

    task_id = cluster.enqueue_one(client, Task(type="sleep", payload=b"0.2"))
    assert wait_exit(a) == -signal.SIGKILL
    died_at = time.time()
    assert "failpoint lease.after_claim: killing this process" in a.process.output()
    claimed = cluster.db.task(task_id)
    assert (claimed["state"], claimed["attempt"]) == ("running", 1)
    assert claimed["worker_id"] == cluster.worker_id(worker)
    assert cluster.starts(task_id) == []  # the lease never reached the worker

    run = cluster.wait_starts(task_id, timeout=LEASE_TTL + TAKEOVER_BOUND + 5)[0]
    cluster.record_recovery(float(run["at"]) - died_at)
    status = wait_final(client, task_id, timeout=10)
    assert status.state is TaskState.SUCCEEDED
    assert [e.event for e in status.history] == RERUN_AFTER_LEASE_EXPIRED
    assert run["attempt"] == "2"
    assert len(cluster.starts(task_id)) == 1
    assert cluster.leader(among=[b]) is b


@pytest.mark.slow
def test_server_killed_mid_enqueue(cluster):
    """The enqueue commits, the server dies before replying; the client retries on B.

    The retry carries the same task id, so B answers with the existing task: the caller gets
    its id, and exactly one task exists, which completes.
    """
    a = cluster.server(name="A", start=False, CONVEYOR_FAILPOINTS="enqueue.after_commit")
    b = cluster.server(name="B", start=False)
    for server in (a, b):
        server.launch()
    for server in (a, b):
        server.wait_ready()
    worker = cluster.worker(b, concurrency=1)
    cluster.wait_registered(worker)
    client = cluster.client(a, b)
    # The client starts at a random address; make its first call go to A.
    if client._ring.current != a.address:
        client._ring.advance()
    assert client._ring.current == a.address

    began = time.monotonic()
    task_id = cluster.enqueue_one(client, Task(type="noop", payload=b"once"))
    cluster.record_recovery(time.monotonic() - began)
    assert wait_exit(a) == -signal.SIGKILL
    assert "failpoint enqueue.after_commit: killing this process" in a.process.output()

    rows = cluster.db.fetch("SELECT id::text AS id FROM conveyor_tasks")
    assert [row["id"] for row in rows] == [task_id]
    status = wait_final(client, task_id, timeout=10)
    assert status.state is TaskState.SUCCEEDED
    assert status.result == b"once"
    assert [e.event for e in status.history] == ["enqueued", "started", "succeeded"]
    assert len(cluster.starts(task_id)) == 1


def terms(cluster) -> list[tuple[int, str]]:
    rows = cluster.db.fetch(
        "SELECT term, holder FROM conveyor_leader_terms WHERE name = 'maintenance' ORDER BY term"
    )
    return [(row["term"], row["holder"]) for row in rows]


def leader_row(cluster):
    return cluster.db.fetch(
        "SELECT holder, term, elected_at, expires_at > now() AS active FROM conveyor_leader"
    )[0]


def kill_busy_worker(cluster, workers, task_id):
    """SIGKILL whichever worker runs `task_id`; return (victim, survivor)."""
    first = cluster.wait_starts(task_id)[0]
    victim = cluster.worker_by_pid(first["pid"])
    survivor = next(w for w in workers if w is not victim)
    signal_process(victim, signal.SIGKILL)
    victim.wait(10)
    return victim, survivor


@pytest.mark.slow
def test_kill_leader(cluster):
    """kill -9 the leader: the other server leads within the TTL, and reaping goes on."""
    servers = cluster.start_servers(2)
    leader = cluster.leader()
    follower = next(s for s in servers if s is not leader)
    workers = [cluster.worker(follower, concurrency=1) for _ in range(2)]
    cluster.wait_registered(*workers)
    client = cluster.client(follower)
    old_term = leader_row(cluster)["term"]

    killed_at = time.monotonic()
    leader.stop(signal.SIGKILL)
    wait_for(follower.is_leader, timeout=TAKEOVER_BOUND + 2, what="the follower to lead")
    took = time.monotonic() - killed_at
    cluster.record_recovery(took)
    assert took < TAKEOVER_BOUND, f"a new leader only after {took:.2f}s"
    row = leader_row(cluster)
    assert (row["holder"], row["active"]) == (follower.server_id, True)
    assert row["term"] > old_term
    assert terms(cluster)[-1] == (row["term"], follower.server_id)

    # Reaping continues under the new leader: a task whose worker dies is recovered.
    task_id = cluster.enqueue_one(client, Task(type="sleep", payload=b"1"))
    _, survivor = kill_busy_worker(cluster, workers, task_id)
    rerun = cluster.wait_starts(task_id, 2, timeout=LEASE_TTL + 5)[1]
    assert int(rerun["pid"]) == survivor.pid
    status = wait_final(client, task_id, timeout=10)
    assert status.state is TaskState.SUCCEEDED
    assert [e.event for e in status.history] == RERUN_AFTER_LEASE_EXPIRED
    assert status.history[2].at >= row["elected_at"]


@pytest.mark.slow
def test_sigstop_leader_past_its_ttl(cluster):
    """A leader frozen past its TTL is replaced; resumed, it knows it no longer leads.

    While the old leader is frozen, the other server takes over with a higher term, and a
    task whose worker is killed meanwhile is reaped (by the new leader: the old one cannot
    run). After SIGCONT the old leader reports is_leader false within a few seconds, and the
    terms table has one holder per term.
    """
    servers = cluster.start_servers(2)
    old = cluster.leader()
    new = next(s for s in servers if s is not old)
    workers = [cluster.worker(new, concurrency=1) for _ in range(2)]
    cluster.wait_registered(*workers)
    client = cluster.client(new)
    old_term = leader_row(cluster)["term"]
    assert terms(cluster)[-1] == (old_term, old.server_id)
    task_id = cluster.enqueue_one(client, Task(type="sleep", payload=b"1"))
    cluster.wait_starts(task_id)

    paused_at = time.monotonic()
    old.send_signal(signal.SIGSTOP)
    kill_busy_worker(cluster, workers, task_id)
    wait_for(new.is_leader, timeout=TAKEOVER_BOUND + 2, what="the other server to lead")
    cluster.record_recovery(time.monotonic() - paused_at)
    row = leader_row(cluster)
    assert (row["holder"], row["active"]) == (new.server_id, True)
    assert row["term"] > old_term
    # The dead worker's task is reaped while the old leader is still frozen.
    cluster.wait_starts(task_id, 2, timeout=LEASE_TTL + 5)
    expired = [e for e in cluster.db.events(task_id) if e["event"] == "lease_expired"]
    assert len(expired) == 1
    assert expired[0]["at"] >= row["elected_at"]
    # The fault itself: frozen for longer than its TTL (it already is), and a bit more.
    time.sleep(max(0.0, paused_at + LEADER_TTL + 1.0 - time.monotonic()))
    old.send_signal(signal.SIGCONT)

    resumed_at = time.monotonic()
    wait_for(lambda: old.status() is not None, timeout=5, what="the old leader to answer")
    wait_for(lambda: not old.is_leader(), timeout=5, what="the old leader to step down")
    assert time.monotonic() - resumed_at < 5
    # Several renewal rounds later, it still does not lead, and nothing changed hands.
    deadline = time.monotonic() + LEADER_TTL / 3 * 2
    while time.monotonic() < deadline:
        assert not old.is_leader()
        assert new.is_leader()
        time.sleep(0.2)
    assert old.metric("conveyor_leader") == 0
    assert "no longer leads" in old.process.output()
    current = leader_row(cluster)
    assert (current["holder"], current["term"]) == (new.server_id, row["term"])
    recorded = terms(cluster)
    assert [term for term, _ in recorded] == sorted({term for term, _ in recorded})
    assert (old_term, old.server_id) in recorded
    assert recorded[-1] == (row["term"], new.server_id)
    assert wait_final(client, task_id, timeout=10).state is TaskState.SUCCEEDED
