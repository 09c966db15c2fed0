"""Rolling upgrade: servers of older releases on a database this release migrated, serving
workers and clients of this release, and beside servers of this release.

operations.md ("Which servers run on a newer schema"): a server runs on a newer schema when
every newer migration allows it, and stays ready; 0016 says servers of schema 15 run on it
unchanged. The older servers are the repository's own history (`git archive <rev>`), run
as real `conveyor server` processes with PYTHONPATH at their sources.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    OLD_LONG_POLL_RELEASE,
    OLD_SCHEMA_15_RELEASE,
    REPO_ROOT,
    Ledger,
    ServerProcess,
    get_json,
    old_release,
    wait_final,
    wait_for,
)

from conveyor import Client, Task, TaskState
from conveyor.errors import InvalidTask, TaskAlreadyFinished, TaskNotFound

SCHEMA_15_REVS = (OLD_SCHEMA_15_RELEASE,)
# Schema 6: before the ledger's compatibility column.
PRE_0014_REV = OLD_LONG_POLL_RELEASE
pytestmark = pytest.mark.slow


def old_server(processes, database_url: str, rev: str, *extra: str, name: str) -> ServerProcess:
    tree = old_release(rev)

    def spawn(argv: list[str], *, name: str) -> Any:
        return processes(
            argv, name=name, PYTHONPATH=os.pathsep.join([str(tree / "src"), str(tree / "tests")])
        )

    return ServerProcess(spawn, database_url, extra_args=tuple(extra), name=name)


def new_server(processes, database_url: str, *extra: str, name: str) -> ServerProcess:
    return ServerProcess(processes, database_url, extra_args=tuple(extra), name=name)


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


def spawn_worker_of(
    processes,
    tmp_path: Path,
    tree: Path | None,
    address: str,
    ledger: Ledger,
    name: str,
    **env: str,
):
    """A `conveyor worker` process of `tree`'s release (None: this release)."""
    app_dir = tmp_path / "vapp"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "vapp.py").write_text(APP)
    paths = [str(app_dir)]
    if tree is not None:
        paths += [str(tree / "src"), str(tree / "tests")]
    else:
        paths += [str(REPO_ROOT / "src"), str(REPO_ROOT / "tests")]
    return processes(
        [sys.executable, "-m", "conveyor", "worker", "vapp:worker", "--server", address],
        name=name,
        PYTHONPATH=os.pathsep.join(paths),
        CONVEYOR_TEST_LEDGER=str(ledger.path),
        **env,
    )


def starts(ledger: Ledger) -> Counter[str]:
    return Counter(e["task_id"] for e in ledger.entries() if e["event"] == "start")


@pytest.mark.parametrize("rev", SCHEMA_15_REVS)
def test_a_schema_15_server_stays_ready_on_this_releases_schema(
    rev, processes, database_url
) -> None:
    server = old_server(processes, database_url, rev, name=f"old-{rev}").start()
    status, document = get_json(f"{server.http_url}/readyz")
    assert status == 200, document


def test_a_pre_0014_server_refuses_this_releases_schema_clearly(processes, database_url) -> None:
    """Documented: servers before 0014 refuse any newer schema."""
    server = old_server(processes, database_url, PRE_0014_REV, name="old")
    server.process = processes(
        server.argv(), name="old-1", PYTHONPATH=str(old_release(PRE_0014_REV) / "src")
    )
    code = server.process.wait(60)
    assert code != 0
    assert "newer" in server.process.output() or "schema" in server.process.output()


@pytest.mark.parametrize("rev", SCHEMA_15_REVS)
def test_new_worker_and_client_against_a_schema_15_server(
    rev, processes, database_url, tmp_path, ledger
) -> None:
    server = old_server(
        processes, database_url, rev, "--max-payload-bytes", "1000", name=f"old-{rev}"
    ).start()
    child = spawn_worker_of(processes, tmp_path, None, server.address, ledger, "new-worker")
    with Client(server.address) as client:
        ok = [client.enqueue_task(Task(type="noop", payload=b"x%d" % i)) for i in range(10)]
        ok += client.enqueue_tasks([Task(type="noop", payload=b"y%d" % i) for i in range(10)])
        flaky = client.enqueue_task(Task(type="flaky", payload=b"3", max_retries=3))
        failing = client.enqueue_task(Task(type="always_fail", payload=b"boom", max_retries=1))
        for task_id in ok:
            assert wait_final(client, task_id).state is TaskState.SUCCEEDED
        flaky_status = wait_final(client, flaky)
        assert flaky_status.state is TaskState.SUCCEEDED
        assert flaky_status.attempts == 3
        failed = wait_final(client, failing)
        assert failed.state is TaskState.FAILED
        assert failed.attempts == 2
        # GetTask carries the explanation since this server's release: the client asks
        # the older server for it on its own (ExplainTask), instead of leaving it out.
        explained = client.get_task_status(failing, explain=True)
        assert explained.explanation[0].startswith("failed for good after 2 attempt(s)"), (
            explained.explanation
        )
        with pytest.raises(TaskAlreadyFinished):
            client.cancel_task(ok[0])
        with pytest.raises(TaskNotFound):
            client.get_task_status("01a23db2-0000-7000-8000-000000000000")
        with pytest.raises(InvalidTask):
            client.enqueue_task(Task(type="noop", payload=b"x" * 5000))
        queued = client.enqueue_task(Task(type="not.served"))
        assert client.cancel_task(queued).state is TaskState.CANCELLED
    counts = starts(ledger)
    assert all(counts[t] == 1 for t in ok), counts
    assert counts[flaky] == 3
    child.stop()
    assert child.process.returncode == 0
    assert "Traceback" not in child.output(), child.output()


@pytest.mark.parametrize("rev", SCHEMA_15_REVS)
def test_new_worker_keeps_its_leases_and_hands_back_on_a_schema_15_server(
    rev, processes, database_url, tmp_path, ledger
) -> None:
    server = old_server(
        processes,
        database_url,
        rev,
        "--lease-ttl",
        "2",
        "--heartbeat-interval",
        "0.4",
        "--worker-lost-after",
        "2",
        name=f"old-{rev}",
    ).start()
    child = spawn_worker_of(
        processes, tmp_path, None, server.address, ledger, "new-worker", VAPP_DRAIN="1"
    )
    with Client(server.address) as client:
        kept = [client.enqueue_task(Task(type="sleep", payload=b"6")) for _ in range(2)]
        for task_id in kept:
            status = wait_final(client, task_id, timeout=40)
            assert status.state is TaskState.SUCCEEDED
            assert status.attempts == 1
        long = [client.enqueue_task(Task(type="sync_sleep", payload=b"60")) for _ in range(3)]
        wait_for(lambda: all(starts(ledger)[t] == 1 for t in long), timeout=20)
        child.signal(signal.SIGTERM)
        assert child.wait(30) == 0
        for task_id in long:
            status = wait_for(
                lambda t=task_id: (
                    (s := client.get_task_status(t, history=True)).state is TaskState.QUEUED and s
                ),
                timeout=10,
            )
            assert "lease_expired" not in [e.event for e in status.history]


def leader_of(server: ServerProcess) -> str | None:
    _, document = get_json(f"{server.http_url}/status")
    leader = document.get("leader")
    return leader["server_id"] if leader and leader.get("active") else None


@pytest.mark.parametrize("rev", SCHEMA_15_REVS)
def test_old_and_new_servers_side_by_side(rev, processes, database_url, tmp_path, ledger) -> None:
    """An old leader sweeps a new server's dead worker; SIGTERM hands leadership to the new
    server, which then sweeps an old server's dead worker. No task lost or run twice
    without a lease loss."""
    common = (
        "--lease-ttl",
        "3",
        "--heartbeat-interval",
        "0.5",
        "--worker-lost-after",
        "2",
        "--reaper-interval",
        "0.2",
        "--leader-ttl",
        "3",
    )
    old = old_server(
        processes, database_url, rev, *common, "--server-id", "old", name=f"old-{rev}"
    ).start()
    wait_for(lambda: leader_of(old) == "old", timeout=20, what="old leads")
    new = new_server(processes, database_url, *common, "--server-id", "new", name="new").start()
    assert leader_of(new) == "old"

    tree = old_release(rev)
    w_new = spawn_worker_of(processes, tmp_path, None, new.address, ledger, "w-new")
    w_old = spawn_worker_of(processes, tmp_path, tree, old.address, ledger, "w-old")
    with Client(f"{old.address},{new.address}") as client:
        ids = [client.enqueue_task(Task(type="noop")) for _ in range(40)]
        ids += [
            client.enqueue_task(Task(type="flaky", payload=b"2", max_retries=2)) for _ in range(6)
        ]
        for task_id in ids:
            assert wait_final(client, task_id).state is TaskState.SUCCEEDED
        # A worker of the new server dies holding leases: the old leader sweeps it.
        w_old.stop()
        sleepers = [client.enqueue_task(Task(type="sleep", payload=b"1")) for _ in range(3)]
        wait_for(lambda: all(starts(ledger)[t] >= 1 for t in sleepers), timeout=20)
        w_new.signal(signal.SIGKILL)
        w_new.wait(10)
        w_old2 = spawn_worker_of(
            processes, tmp_path, tree, f"{old.address},{new.address}", ledger, "w-old2"
        )
        for task_id in sleepers:
            status = wait_final(client, task_id, timeout=40)
            assert status.state is TaskState.SUCCEEDED, status
        # Leadership moves to the new server at once on SIGTERM of the old one.
        old.stop()
        wait_for(lambda: leader_of(new) == "new", timeout=5, what="new leads")
        more = [client.enqueue_task(Task(type="sleep", payload=b"1")) for _ in range(3)]
        wait_for(lambda: all(starts(ledger)[t] >= 1 for t in more), timeout=20)
        w_old2.signal(signal.SIGKILL)
        w_old2.wait(10)
        spawn_worker_of(processes, tmp_path, None, new.address, ledger, "w-new2")
        for task_id in more:
            status = wait_final(client, task_id, timeout=40)
            assert status.state is TaskState.SUCCEEDED, status
    counts = starts(ledger)
    assert all(counts[t] == 1 for t in ids if t not in ids[40:]), counts
