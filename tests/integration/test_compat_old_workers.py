"""Rolling upgrade: workers of older releases against a server of this release.

operations.md says servers and workers "can be upgraded in any order" and that "an old
worker keeps long-polling new servers (LeaseTasks and ReportResults stay)". The older
releases are the repository's own history, extracted read-only with
`git archive <rev> | tar -x -C /tmp/rv-<rev>`, run as real `conveyor worker` processes
with PYTHONPATH pointing at their sources. The database is migrated by this release.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import (
    OLD_LONG_POLL_RELEASE,
    OLD_SCHEMA_15_RELEASE,
    Ledger,
    old_release,
    wait_final,
    wait_for,
)

from conveyor import Client, Task, TaskState

OLD_REVS = (OLD_LONG_POLL_RELEASE, OLD_SCHEMA_15_RELEASE)
# Slow as a whole: each test starts worker processes of another release.
pytestmark = pytest.mark.slow


APP = """
import os
from datetime import timedelta
from conveyor import Worker
import worker_apps as w

worker = Worker(
    concurrency=int(os.environ.get("VAPP_CONCURRENCY", "4")),
    drain_timeout=timedelta(seconds=float(os.environ.get("VAPP_DRAIN", "30"))),
)
for name in ("noop", "sleep", "sync_sleep", "flaky", "always_fail", "permanent_fail"):
    worker.register_handler(name, getattr(w, name))
"""


def spawn_old_worker(
    processes, tmp_path: Path, rev: str, address: str, ledger: Ledger, name: str, **env: str
):
    tree = old_release(rev)
    app_dir = tmp_path / "vapp"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "vapp.py").write_text(APP)
    return processes(
        [sys.executable, "-m", "conveyor", "worker", "vapp:worker", "--server", address],
        name=name,
        PYTHONPATH=os.pathsep.join([str(app_dir), str(tree / "src"), str(tree / "tests")]),
        CONVEYOR_TEST_LEDGER=str(ledger.path),
        **env,
    )


def starts(ledger: Ledger) -> Counter[str]:
    return Counter(e["task_id"] for e in ledger.entries() if e["event"] == "start")


@pytest.mark.parametrize("rev", OLD_REVS)
def test_old_worker_runs_succeeds_fails_and_retries_on_a_new_server(
    rev, start_server, processes, tmp_path, ledger
) -> None:
    server = start_server()
    child = spawn_old_worker(processes, tmp_path, rev, server.address, ledger, f"old-{rev}")
    with Client(server.address) as client:
        ok = [client.enqueue_task(Task(type="noop", payload=b"x%d" % i)) for i in range(20)]
        flaky = client.enqueue_task(Task(type="flaky", payload=b"3", max_retries=3))
        failing = client.enqueue_task(Task(type="always_fail", payload=b"boom", max_retries=1))
        permanent = client.enqueue_task(Task(type="permanent_fail", max_retries=3))
        for task_id in ok:
            status = wait_final(client, task_id)
            assert status.state is TaskState.SUCCEEDED, (status, child.output())
        flaky_status = wait_final(client, flaky)
        assert flaky_status.state is TaskState.SUCCEEDED, flaky_status
        assert flaky_status.attempts == 3
        failed = wait_final(client, failing)
        assert failed.state is TaskState.FAILED
        assert failed.attempts == 2
        assert "boom" in (failed.last_error or "")
        perm = wait_final(client, permanent)
        assert perm.state is TaskState.FAILED
        assert perm.attempts == 1
    counts = starts(ledger)
    assert all(counts[t] == 1 for t in ok), counts
    assert counts[flaky] == 3
    assert counts[failing] == 2
    assert counts[permanent] == 1
    child.stop()
    assert child.process.returncode == 0, child.output()
    assert "Traceback" not in child.output(), child.output()


@pytest.mark.parametrize("rev", OLD_REVS)
def test_old_worker_heartbeats_keep_its_leases_on_a_new_server(
    rev, start_server, processes, tmp_path, ledger
) -> None:
    """A task running four lease lengths: the old worker's beats must keep it."""
    server = start_server(
        lease_ttl=timedelta(seconds=2),
        heartbeat_interval=timedelta(milliseconds=400),
        worker_lost_after=timedelta(seconds=2),
    )
    spawn_old_worker(processes, tmp_path, rev, server.address, ledger, f"old-{rev}")
    with Client(server.address) as client:
        ids = [client.enqueue_task(Task(type="sleep", payload=b"8")) for _ in range(2)]
        for task_id in ids:
            status = wait_final(client, task_id, timeout=40)
            assert status.state is TaskState.SUCCEEDED, status
            assert status.attempts == 1
            events = [e.event for e in status.history]
            assert "lease_expired" not in events, events
    counts = starts(ledger)
    assert all(counts[t] == 1 for t in ids), counts


@pytest.mark.parametrize("rev", OLD_REVS)
def test_old_worker_graceful_stop_hands_back_to_a_new_server(
    rev, start_server, processes, tmp_path, ledger
) -> None:
    """SIGTERM with tasks running past the drain timeout: handed back, queued at once, run
    once more by another (new-release) worker, none lost."""
    server = start_server()
    child = spawn_old_worker(
        processes, tmp_path, rev, server.address, ledger, f"old-{rev}", VAPP_DRAIN="1"
    )
    with Client(server.address) as client:
        ids = [client.enqueue_task(Task(type="sync_sleep", payload=b"60")) for _ in range(4)]
        wait_for(lambda: len(starts(ledger)) == 4, timeout=30, what="4 starts")
        started = time.monotonic()
        child.signal(signal.SIGTERM)
        assert child.wait(30) == 0, child.output()
        # Handed back: queued again, attempt not spent, at once (not after a lease expiry).
        for task_id in ids:
            status = wait_for(
                lambda t=task_id: (s := client.get_task_status(t)).state is TaskState.QUEUED and s,
                timeout=10,
                what=f"{task_id} queued again",
            )
        assert time.monotonic() - started < 15
        for task_id in ids:
            status = client.get_task_status(task_id, history=True)
            assert status.state is TaskState.QUEUED, status
            assert status.attempts == 0, status
            assert "lease_expired" not in [e.event for e in status.history]


# Not the long-polling release: stopped, it loses the poll's reply on its way, whose
# tasks wait for their lease to expire (an attempt each); operations.md says so.
@pytest.mark.timeout(300)
@pytest.mark.parametrize("rev", [OLD_SCHEMA_15_RELEASE])
def test_old_worker_stopped_under_load_loses_no_task(
    rev, start_server, processes, tmp_path, ledger, db
) -> None:
    """SIGTERM a worker of the previous release mid-flow against a server of this one,
    four times: every task it leased runs or is handed back (operations.md, "Stop
    gracefully": it "hands the rest back without spending their attempts")."""
    server = start_server(lease_ttl=timedelta(seconds=3), heartbeat_interval=timedelta(seconds=1))
    all_ids: list[str] = []
    with Client(server.address) as client:
        for cycle in range(4):
            child = spawn_old_worker(
                processes,
                tmp_path,
                rev,
                server.address,
                ledger,
                f"old-{cycle}",
                VAPP_CONCURRENCY="32",
            )
            before = len(starts(ledger))
            for _ in range(4):
                all_ids += client.enqueue_tasks(
                    [Task(type="noop", payload=b"x", max_retries=0) for _ in range(500)]
                )
            wait_for(lambda b=before: len(starts(ledger)) >= b + 500, timeout=60)
            child.signal(signal.SIGTERM)
            assert child.wait(60) == 0, child.output()
            # The rest run on a worker of this release before the next cycle.
            finisher = processes(
                [
                    sys.executable,
                    "-m",
                    "conveyor",
                    "worker",
                    "worker_apps:worker",
                    "--server",
                    server.address,
                    "--concurrency",
                    "32",
                ],
                name=f"finisher-{cycle}",
                CONVEYOR_TEST_LEDGER=str(ledger.path),
            )
            wait_for(
                lambda: (
                    db.fetchval(
                        "SELECT count(*) FROM conveyor_tasks WHERE state IN ('queued', 'running')"
                    )
                    == 0
                ),
                timeout=120,
                what="every task final",
            )
            finisher.signal(signal.SIGTERM)
            finisher.wait(60)
    ran = starts(ledger)
    failed_unrun = [
        str(r["id"])
        for r in db.fetch("SELECT id FROM conveyor_tasks WHERE state = 'failed'")
        if not ran[str(r["id"])]
    ]
    assert failed_unrun == [], (
        f"{len(failed_unrun)} of {len(all_ids)} tasks leased to a gracefully stopped old "
        f"worker failed (lease_expired, max_retries=0) without ever running"
    )
