"""Soak: steady load on 2 servers and 8 workers, with a fault every 10 seconds.

50 client threads (each its own Client knowing both servers) enqueue short tasks for
CONVEYOR_SOAK_SECONDS (default 60: every fault below once, within the suite's CI budget;
set it longer for a real soak), while the test injects one fault every 10 s, in
rotation:

    kill -9 a worker and start a replacement;
    SIGSTOP a worker for longer than its lease, then SIGCONT (a zombie);
    restart a server with SIGTERM (graceful);
    kill -9 a server and start it again;
    pg_terminate_backend on every server connection.

Afterwards every acknowledged task must have succeeded, every invariant must hold
(faults/cluster.py: check_invariants), and no enqueue may have failed: clients retry
transient errors, so an error a producer sees is one no server should have returned.
Each fault's recovery time goes to the results notes (the worst is the soak's "recover"):
for a worker killed or frozen, until none of its tasks is still running under its lease;
for a server restarted or killed, until it is ready again; for terminated backends, until
every server listens for notifications again. The machine has 2 cores, so the load is modest:
mostly `async_noop` tasks, some short `sleep`s, each client enqueueing every 0.4-0.8 s
(about 80 tasks/s in all; 110/s already keeps both cores busy), so that recovery is not
starved of CPU.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import defaultdict

import pytest
from faults.cluster import LEASE_TTL, real_pid, signal_process
from helpers import wait_for

from conveyor import Task
from conveyor.types import new_task_id

SOAK_SECONDS = float(os.environ.get("CONVEYOR_SOAK_SECONDS", "60"))
# The longest fault (a worker SIGSTOPped for PAUSE, 5 s) and every recovery (the worst
# under 2 s in the suite's runs) fit in it, with steady load in between.
FAULT_EVERY = 10.0
CLIENTS = 50
WORKERS = 8
CONCURRENCY = 4
ENQUEUE_PAUSE = (0.4, 0.8)
PAUSE = LEASE_TTL + 1.0  # a SIGSTOPped worker stays frozen past its lease
DRAIN_TIMEOUT = 90.0


def random_task(rng: random.Random) -> Task:
    """Mostly no-ops, some short sleeps; the id is set here so a failed enqueue can be traced."""
    if rng.random() < 0.8:
        return Task(type="async_noop", payload=b"soak", id=new_task_id())
    return Task(type="sleep", payload=f"{rng.uniform(0.05, 0.5):.2f}".encode(), id=new_task_id())


class Soak:
    """The soak's moving parts: servers, live workers, producers and the fault rotation."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.rng = random.Random()
        self.servers = cluster.start_servers(2)
        self.workers = [self.new_worker(n) for n in range(WORKERS)]
        cluster.wait_registered(*self.workers)
        self.stop = threading.Event()
        self.errors: list[tuple[str | None, BaseException]] = []
        self.recoveries: dict[str, list[float]] = defaultdict(list)
        self.spawned = WORKERS

    def new_worker(self, n: int):
        # Half list A first, half B first (the ring then starts at a random one anyway).
        order = self.servers if n % 2 == 0 else self.servers[::-1]
        return self.cluster.worker(*order, concurrency=CONCURRENCY, name=f"soak-worker{n}")

    # --- load ---------------------------------------------------------------------------

    def produce(self, client) -> None:
        rng = random.Random()
        while not self.stop.is_set():
            task = random_task(rng)
            try:
                self.cluster.enqueue_one(client, task)
            except Exception as exc:  # recorded: clients retry for 60 s, none should fail
                self.errors.append((task.id, exc))
            self.stop.wait(rng.uniform(*ENQUEUE_PAUSE))

    def describe_errors(self) -> str:
        """The failed enqueues, and which of them had committed anyway."""
        ids = [task_id for task_id, _ in self.errors]
        committed = {
            row["id"]
            for row in self.cluster.db.fetch(
                "SELECT id::text AS id FROM conveyor_tasks WHERE id = ANY($1::uuid[])", ids
            )
        }
        lines = [
            f"{task_id}: {exc!r} ({'committed' if task_id in committed else 'not in the database'})"
            for task_id, exc in self.errors[:10]
        ]
        return f"{len(self.errors)} enqueue(s) failed:\n" + "\n".join(lines)

    # --- faults -------------------------------------------------------------------------

    def running_on(self, worker) -> int:
        worker_id = self.cluster.worker_id(worker)
        return int(
            self.cluster.db.fetchval(
                "SELECT count(*) FROM conveyor_tasks WHERE state = 'running' AND worker_id = $1",
                worker_id,
            )
        )

    def kill_worker(self) -> float:
        """kill -9 a worker, start a replacement; until its tasks are taken back."""
        victim = self.rng.choice(self.workers)
        self.workers.remove(victim)
        began = time.monotonic()
        signal_process(victim, signal.SIGKILL)
        victim.wait(10)
        replacement = self.new_worker(self.spawned)
        self.spawned += 1
        self.workers.append(replacement)
        wait_for(lambda: self.running_on(victim) == 0, timeout=15, what="the victim's tasks back")
        took = time.monotonic() - began
        self.cluster.wait_registered(replacement)
        return took

    def pause_worker(self) -> float:
        """SIGSTOP a worker past its lease, SIGCONT; until its tasks were taken back."""
        zombie = self.rng.choice(self.workers)
        began = time.monotonic()
        signal_process(zombie, signal.SIGSTOP)
        try:
            wait_for(
                lambda: self.running_on(zombie) == 0, timeout=15, what="the zombie's tasks back"
            )
            took = time.monotonic() - began
            time.sleep(max(0.0, began + PAUSE - time.monotonic()))  # the fault itself
        finally:
            signal_process(zombie, signal.SIGCONT)
        return took

    def restart_server(self) -> float:
        """SIGTERM a server and start it again; until it is ready."""
        server = self.rng.choice(self.servers)
        began = time.monotonic()
        assert server.stop(signal.SIGTERM) == 0, server.process.output()[-3000:]
        server.start()
        return time.monotonic() - began

    def kill_server(self) -> float:
        """kill -9 a server and start it again; until it is ready."""
        server = self.rng.choice(self.servers)
        began = time.monotonic()
        server.stop(signal.SIGKILL)
        server.start()
        return time.monotonic() - began

    def terminate_backends(self) -> float:
        """pg_terminate_backend on every server connection; until both listen again."""
        backends = "application_name LIKE 'conveyor-server%' AND datname = current_database()"
        began = time.monotonic()
        terminated = {
            row["pid"]
            for row in self.cluster.db.fetch(
                f"SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE {backends}"  # noqa: S608 - constant text
            )
        }
        assert terminated

        def back() -> bool:
            rows = self.cluster.db.fetch(
                f"SELECT pid, query FROM pg_stat_activity WHERE {backends}"  # noqa: S608
            )
            listeners = [
                r for r in rows if r["pid"] not in terminated and r["query"].startswith("LISTEN")
            ]
            return len(listeners) >= len(self.servers) and all(
                (s.status() or {}).get("listening_for_notifications") for s in self.servers
            )

        wait_for(back, timeout=15, interval=0.05, what="every server to listen again")
        return time.monotonic() - began


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 240)
def test_soak(cluster):
    """Load from 50 clients, 8 workers on 2 servers, one fault every 10 s: invariants hold."""
    soak = Soak(cluster)
    faults = [
        ("kill -9 worker", soak.kill_worker),
        ("SIGSTOP worker", soak.pause_worker),
        ("SIGTERM server", soak.restart_server),
        ("kill -9 server", soak.kill_server),
        ("terminate backends", soak.terminate_backends),
    ]
    producers = [
        threading.Thread(
            target=soak.produce,
            args=(cluster.client(*soak.servers),),
            name=f"producer-{n}",
            daemon=True,
        )
        for n in range(CLIENTS)
    ]
    began = time.monotonic()
    for thread in producers:
        thread.start()
    try:
        ends_at = began + SOAK_SECONDS
        next_fault = began + FAULT_EVERY
        injected = 0
        while next_fault < ends_at:
            time.sleep(max(0.0, next_fault - time.monotonic()))  # the soak's fault schedule
            name, inject = faults[injected % len(faults)]
            soak.recoveries[name].append(inject())
            injected += 1
            next_fault += FAULT_EVERY
        time.sleep(max(0.0, ends_at - time.monotonic()))
    finally:
        soak.stop.set()
        for thread in producers:
            thread.join(90)
    assert not any(thread.is_alive() for thread in producers)
    elapsed = time.monotonic() - began
    for name, times in soak.recoveries.items():
        cluster.record_recovery(max(times))
        cluster.notes.append(f"{name}: {', '.join(f'{t:.1f}s' for t in times)}")
    cluster.notes.append(f"{len(cluster.acked)} tasks in {elapsed:.0f}s, {injected} faults")
    assert injected >= min(len(faults), int(SOAK_SECONDS // FAULT_EVERY) - 1)

    wait_for(
        lambda: (
            cluster.db.fetchval(
                "SELECT count(*) FROM conveyor_tasks "
                "WHERE state IN ('queued', 'scheduled', 'running')"
            )
            == 0
        ),
        timeout=DRAIN_TIMEOUT,
        interval=0.5,
        what="the backlog to drain",
    )
    succeeded = {
        row["id"]
        for row in cluster.db.fetch(
            "SELECT id::text AS id FROM conveyor_tasks WHERE state = 'succeeded'"
        )
    }
    assert cluster.acked <= succeeded, f"{len(cluster.acked - succeeded)} acked, not succeeded"
    total = cluster.db.fetchval("SELECT count(*) FROM conveyor_tasks")
    assert total == len(succeeded), "some tasks failed or were cancelled"
    # Every worker process still running is a live member, and all of them are registered.
    live = [w for w in soak.workers if w.process.poll() is None]
    assert len(live) == WORKERS
    active = {
        row["pid"]
        for row in cluster.db.fetch("SELECT pid FROM conveyor_workers WHERE state = 'active'")
    }
    assert {real_pid(w.pid) for w in live} <= active
    # No enqueue may fail: clients retry transient errors (for 60 s here) and one server is
    # always up, so any error a producer saw is one the server should not have returned.
    assert not soak.errors, soak.describe_errors()
