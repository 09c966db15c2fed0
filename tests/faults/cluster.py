"""The fault-injection suite's machinery: clusters of real processes, and the invariants.

A `Cluster` holds one scenario's `conveyor server` processes (on the test's database),
`conveyor worker` processes running tests/worker_apps.py:worker (whose handlers record every
execution in the test's ledger), optional `FaultProxy`s between workers and servers, and
clients whose acknowledged enqueues it remembers. Faults are real: processes are signalled
by PID (SIGKILL, SIGSTOP/SIGCONT, SIGTERM), PostgreSQL is stopped or its backends
terminated, and the proxy delays, stalls or partitions the worker links.

`check_invariants` is what every scenario must leave true (see its docstring); the
`cluster` fixture in conftest.py runs it after each scenario and keeps a row of the
results table (faults/results.py).

Quick server settings (`QUICK_SERVER_ARGS`), chosen so that every recovery path takes
seconds instead of the production tens of seconds, with the same ratios as the defaults:

    --lease-ttl 4            a lease lasts 4 s without a heartbeat (default 30)
    --heartbeat-interval 0.5 workers heartbeat every 0.5 s: 8 per lease (default 3 s)
    --worker-lost-after 2    4 missed heartbeats mark a worker lost and end its leases, so
                             a dead worker's task is back in ~2.3 s, before its lease ends
    --leader-ttl 3           a dead leader is replaced within 3 s + 0.75 s (retry interval)
    --reaper-interval 0.2    reaper and sweeper rounds
    (--retry-backoff-base 0.05 --retry-backoff-cap 0.4 are added by helpers.ServerProcess)

The delay-and-loss scenario keeps the defaults of the first three (see its module).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from faults.proxy import FaultProxy
from helpers import Db, Ledger, ServerProcess, conveyor_command, wait_for

from conveyor import Client, Task
from conveyor.client.channel import RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

QUICK_SERVER_ARGS: tuple[str, ...] = (
    "--lease-ttl",
    "4",
    "--heartbeat-interval",
    "0.5",
    "--worker-lost-after",
    "2",
    "--leader-ttl",
    "3",
    "--reaper-interval",
    "0.2",
)
# Leader and reaper settings only: lease, heartbeat and worker-lost-after stay the defaults.
QUICK_MAINTENANCE_ARGS: tuple[str, ...] = ("--leader-ttl", "3", "--reaper-interval", "0.2")
LEASE_TTL = 4.0
WORKER_LOST_AFTER = 2.0
LEADER_TTL = 3.0
# Clients in the suite retry for up to a minute: PostgreSQL restarts are part of the plan.
CLIENT_RETRY = RetryPolicy(total_timeout=timedelta(seconds=60))
# How long the invariant checker waits for every acknowledged task to reach a final state.
FINAL_STATE_TIMEOUT = 60.0

# Events that end the attempt opened by the preceding 'started' (the outcome of a lease).
ATTEMPT_OUTCOMES = frozenset({"succeeded", "failed", "timed_out", "lease_expired", "released"})
# Outcomes after which a task may legitimately run again (and the state they leave).
RERUN_CAUSES = frozenset({"lease_expired", "timed_out", "released", "failed"})
# A retry waits out its backoff as `scheduled` (migration 0015) and joins the queue when it
# ends, which writes no event: `started` may follow either.
OUTCOME_STATES = {
    "succeeded": {"succeeded"},
    "failed": {"scheduled", "failed"},
    "timed_out": {"scheduled", "failed"},
    "lease_expired": {"scheduled", "failed"},
    "released": {"queued"},
}
WAITING_STATES = frozenset({"queued", "scheduled"})
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


# --- processes ------------------------------------------------------------------------------


def real_pid(pid: int) -> int:
    """The PID of the program itself: `faketime` forks its command and waits for it.

    `faketime` does not forward signals, so a process started under it is signalled
    through its only child. For any other process this returns `pid`.
    """
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return pid
    if comm != "faketime":
        return pid
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return int(children[0]) if children else pid


def signal_process(child: Any, sig: int) -> None:
    """Send `sig` to a ChildProcess by PID (its real program when under faketime)."""
    if child.process is not None and child.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(real_pid(child.pid), sig)


def stop_child(child: Any, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal a ChildProcess (by its real PID), wait, SIGKILL it if it does not exit."""
    if child.process is None:
        return
    if child.process.poll() is None:
        if sig != signal.SIGKILL:
            signal_process(child, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        signal_process(child, sig)
        try:
            child.process.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_process(child, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(10)
    if child.process.poll() is None:
        child.process.kill()
        child.process.wait(10)


class FaultServer(ServerProcess):
    """A `conveyor server` process with a readable server id, env and an argv prefix.

    The server id is `<name>.<generation>`: unique per process (a restart is a new
    process with a new id) and readable in the leader-terms table.
    """

    def __init__(
        self,
        spawn: Callable[..., Any],
        database_url: str,
        *,
        extra_args: tuple[str, ...],
        name: str,
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            functools.partial(spawn, **env) if env else spawn,
            database_url,
            extra_args=extra_args,
            name=name,
        )
        self.prefix = tuple(prefix)

    @property
    def server_id(self) -> str:
        return f"{self.name}.{self.generation}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return real_pid(int(self.process.pid))

    def argv(self) -> list[str]:
        return [*self.prefix, *super().argv(), "--server-id", self.server_id]

    def launch(self) -> FaultServer:
        """Start a new process without waiting for it to be ready (see `wait_ready`)."""
        assert not self.running(), "the server process is already running"
        self.generation += 1
        self.process = self._spawn(self.argv(), name=f"{self.name}-{self.generation}")
        return self

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the server process (by PID)."""
        assert self.process is not None
        signal_process(self.process, sig)

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 30) -> int:
        assert self.process is not None
        if sig != signal.SIGKILL:
            signal_process(self.process, signal.SIGCONT)
        signal_process(self.process, sig)
        return int(self.process.wait(timeout))

    # --- HTTP ------------------------------------------------------------------------------

    def get(self, path: str, *, timeout: float = 3.0) -> tuple[int, bytes]:
        """(status, body) of GET path; (0, b"") when the server does not answer."""
        try:
            with urllib.request.urlopen(f"{self.http_url}{path}", timeout=timeout) as response:  # noqa: S310 - our own http:// URL
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return int(exc.code), exc.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def status(self) -> dict[str, Any] | None:
        code, body = self.get("/status")
        return json.loads(body) if code == 200 else None

    def is_leader(self) -> bool:
        status = self.status()
        return bool(status and status["is_leader"])

    def metric(self, name: str) -> float | None:
        """The value of an unlabelled metric in /metrics."""
        code, body = self.get("/metrics")
        if code != 200:
            return None
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None


# --- the cluster --------------------------------------------------------------------------


def address_of(target: Any) -> str:
    return target if isinstance(target, str) else str(target.address)


@dataclass
class Cluster:
    """The processes, proxies and clients of one scenario, and what it acknowledged."""

    processes: Callable[..., Any]
    database_url: str
    ledger: Ledger
    db: Db
    scenario: str
    servers: list[FaultServer] = field(default_factory=list)
    workers: list[Any] = field(default_factory=list)
    proxies: list[FaultProxy] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)
    recovery_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _names: Counter[str] = field(default_factory=Counter)

    def _label(self, kind: str, name: str | None) -> str:
        if name:
            return name
        self._names[kind] += 1
        return f"{kind}{self._names[kind]}"

    # --- servers ---------------------------------------------------------------------------

    def server(
        self,
        *extra_args: str,
        name: str | None = None,
        quick: Sequence[str] = QUICK_SERVER_ARGS,
        prefix: Sequence[str] = (),
        start: bool = True,
        **env: str,
    ) -> FaultServer:
        """A server with the quick settings (or `quick=...`); started and ready by default."""
        server = FaultServer(
            self.processes,
            self.database_url,
            extra_args=(*quick, *extra_args),
            name=self._label("server", name),
            prefix=prefix,
            env=env or None,
        )
        self.servers.append(server)
        if start:
            server.start()
        return server

    def start_servers(self, count: int, *extra_args: str, **kwargs: Any) -> list[FaultServer]:
        """Start `count` servers at once; return when every one is ready."""
        servers = [self.server(*extra_args, start=False, **kwargs) for _ in range(count)]
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
        return servers

    def leader(self, *, timeout: float = 15.0, among: Sequence[FaultServer] = ()) -> FaultServer:
        """The one running server that says it leads (waits until exactly one does)."""
        candidates = list(among) or self.servers

        def single() -> FaultServer | None:
            leading = [s for s in candidates if s.running() and s.is_leader()]
            return leading[0] if len(leading) == 1 else None

        found: FaultServer = wait_for(single, timeout=timeout, interval=0.05, what="one leader")
        return found

    # --- workers, proxies, clients -----------------------------------------------------------

    def proxy(self, target: Any, *, name: str | None = None, seed: int | None = None) -> FaultProxy:
        """A pass-through FaultProxy to `target`; closed after the scenario."""
        proxy = FaultProxy(address_of(target), name=self._label("proxy", name), seed=seed).start()
        self.proxies.append(proxy)
        return proxy

    def worker(
        self,
        *targets: Any,
        concurrency: int = 4,
        name: str | None = None,
        prefix: Sequence[str] = (),
        **env: str,
    ) -> Any:
        """A `conveyor worker worker_apps:worker` process connected to `targets` in order."""
        label = self._label("worker", name)
        argv = [
            *prefix,
            *conveyor_command(
                "worker",
                "worker_apps:worker",
                "--server",
                ",".join(address_of(t) for t in targets),
                "--concurrency",
                str(concurrency),
            ),
        ]
        child = self.processes(argv, name=label, CONVEYOR_TEST_LEDGER=str(self.ledger.path), **env)
        self.workers.append(child)
        return child

    def wait_registered(self, *workers: Any, timeout: float = 30.0) -> None:
        """Wait until each of these worker processes is registered and active."""

        def registered() -> bool:
            rows = self.db.fetch("SELECT pid FROM conveyor_workers WHERE state = 'active'")
            active = {row["pid"] for row in rows}
            for worker in workers:
                if worker.process.poll() is not None:
                    pytest.fail(f"worker exited early:\n{worker.output()}")
            return all(real_pid(w.pid) in active for w in workers)

        wait_for(registered, timeout=timeout, interval=0.05, what="workers to register")

    def client(self, *targets: Any) -> Client:
        """A Client for `targets` (closed after the scenario), retrying for up to a minute."""
        client = Client([address_of(t) for t in targets], retry=CLIENT_RETRY)
        self.clients.append(client)
        return client

    def enqueue(self, client: Client, tasks: Sequence[Task]) -> list[str]:
        """Enqueue and remember every id the server acknowledged."""
        ids = client.enqueue_tasks(tasks)
        with self._lock:
            self.acked.update(ids)
        return ids

    def enqueue_one(self, client: Client, task: Task) -> str:
        return self.enqueue(client, [task])[0]

    def record_recovery(self, seconds: float) -> None:
        """The scenario's time to recover (kept as the maximum if recorded several times)."""
        with self._lock:
            self.recovery_seconds = max(seconds, self.recovery_seconds or 0.0)

    # --- ledger and history -------------------------------------------------------------------

    def starts(self, task_id: str) -> list[dict[str, str]]:
        """Ledger 'start' rows of one task (its real executions), in order."""
        return [row for row in self.ledger.started() if row["task_id"] == task_id]

    def wait_starts(self, task_id: str, count: int = 1, *, timeout: float = 15.0) -> list[Any]:
        """Wait until the task has been started `count` times (ledger); return the rows."""
        rows: list[Any] = wait_for(
            lambda: (rows := self.starts(task_id)) and len(rows) >= count and rows,
            timeout=timeout,
            interval=0.02,
            what=f"task {task_id} to start {count} time(s)",
        )
        return rows

    def wait_state(self, task_id: str, *states: str, timeout: float = 15.0) -> str:
        """Wait until the task is in one of `states` (database); return the state."""
        state: str = wait_for(
            lambda: (state := self.state(task_id)) in states and state,
            timeout=timeout,
            interval=0.05,
            what=f"task {task_id} to be {' or '.join(states)}",
        )
        return state

    def worker_by_pid(self, pid: int | str) -> Any:
        """The worker ChildProcess with this (real) PID."""
        for worker in self.workers:
            if real_pid(worker.pid) == int(pid):
                return worker
        raise AssertionError(f"no worker process has pid {pid}")

    def worker_id(self, worker: Any) -> str:
        """The id a worker process registered with."""
        rows = self.db.fetch(
            "SELECT id FROM conveyor_workers WHERE pid = $1 ORDER BY started_at DESC",
            real_pid(worker.pid),
        )
        assert rows, f"worker process {worker.pid} is not registered"
        return str(rows[0]["id"])

    def events(self, task_id: str) -> list[str]:
        return [row["event"] for row in self.db.events(task_id)]

    def state(self, task_id: str) -> str:
        return str(self.db.task(task_id)["state"])

    # --- teardown ---------------------------------------------------------------------------

    def stop_everything(self) -> None:
        """Workers (SIGKILL), proxies, clients, then servers (SIGTERM)."""
        for worker in self.workers:
            stop_child(worker, signal.SIGKILL)
        for proxy in self.proxies:
            proxy.close()
        for client in self.clients:
            client.close()
        for server in self.servers:
            if server.process is not None:
                stop_child(server.process, signal.SIGTERM)


# --- invariants ---------------------------------------------------------------------------


@dataclass
class Summary:
    """One row of the results table, and what the checker found wrong."""

    tasks: int = 0
    executions: int = 0
    duplicates: int = 0
    lost: int = 0
    violations: list[str] = field(default_factory=list)


def wait_all_final(db: Db, acked: set[str], timeout: float) -> None:
    """Wait (bounded) until every acknowledged task, and every task at all, is final."""
    if timeout <= 0:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = db.fetch("SELECT id::text AS id, state::text AS state FROM conveyor_tasks")
        states = {row["id"]: row["state"] for row in rows}
        if acked <= set(states) and all(state in FINAL_STATES for state in states.values()):
            return
        time.sleep(0.1)


@dataclass
class _Replay:
    """The state machine of one task's history, fed one event at a time."""

    task_id: str
    state: str = "queued"
    open_attempt: int | None = None
    outcomes: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def feed(self, name: str, after: str, attempt: int) -> None:
        where = f"{self.task_id}: event {name!r} (attempt {attempt}) after state {self.state!r}"
        if name == "started":
            if self.state not in WAITING_STATES:
                self.problems.append(f"{where}: started while not queued")
            self.open_attempt, self.state = attempt, "running"
        elif name in ATTEMPT_OUTCOMES:
            self._outcome(where, name, after, attempt)
        elif name == "cancelled":
            if self.state not in (*WAITING_STATES, "running"):
                self.problems.append(f"{where}: cancelled a final task")
            self.open_attempt, self.state = None, "cancelled"
        else:
            self.problems.append(f"{where}: unknown event")
            return
        if after != self.state:
            self.problems.append(f"{where}: recorded state {after!r}, expected {self.state!r}")

    def _outcome(self, where: str, name: str, after: str, attempt: int) -> None:
        if self.open_attempt is None:
            self.problems.append(f"{where}: an outcome with no attempt running")
        elif attempt != self.open_attempt:
            self.problems.append(f"{where}: not the running attempt {self.open_attempt}")
        if after not in OUTCOME_STATES[name]:
            self.problems.append(f"{where}: leaves state {after!r}")
        if name != "released":  # a release hands its attempt back: not an outcome
            self.outcomes[attempt] += 1
        self.open_attempt, self.state = None, after


def check_history(task: Any, events: list[Any]) -> list[str]:
    """Replay one task's history through the state machine; return what is wrong.

    Each 'started' (from queued) opens an attempt that exactly one outcome (succeeded,
    failed, timed_out, lease_expired, released) or a cancel closes; nothing follows a final
    state; at most one accepted outcome per attempt number; the row ends where history does.
    """
    task_id = str(task["id"])
    if not events or events[0]["event"] != "enqueued":
        names = [e["event"] for e in events]
        return [f"{task_id}: history does not start with 'enqueued': {names}"]
    replay = _Replay(task_id)
    for event in events[1:]:
        replay.feed(event["event"], event["state"], event["attempt"])
    replay.problems.extend(
        f"{task_id}: attempt {n} has {count} accepted outcomes"
        for n, count in replay.outcomes.items()
        if count > 1
    )
    # A promoted retry is `queued` while its history still ends in `scheduled`.
    promoted = replay.state == "scheduled" and task["state"] == "queued"
    if task["state"] != replay.state and not promoted:
        replay.problems.append(
            f"{task_id}: task is {task['state']!r} but its history ends in {replay.state!r}"
        )
    return replay.problems


def check_executions(task: Any, events: list[Any], runs: list[dict[str, str]]) -> list[str]:
    """Compare one task's real executions (ledger) with its history and its retry limit."""
    task_id = str(task["id"])
    problems: list[str] = []
    limit = task["max_retries"] + 1
    attempts = [e["attempt"] for e in events if e["event"] == "started"]
    if task["attempt"] > limit or any(a > limit for a in attempts):
        problems.append(f"{task_id}: attempts {attempts} exceed 1 + max_retries = {limit}")
    if not runs:
        return problems
    if len({r["lease_id"] for r in runs}) != len(runs):
        problems.append(f"{task_id}: a lease executed twice: {[r['lease_id'] for r in runs]}")
    started = Counter(attempts)
    for n, count in Counter(int(r["attempt"]) for r in runs).items():
        if count > started[n]:
            problems.append(
                f"{task_id}: {count} execution(s) of attempt {n}, {started[n]} 'started' event(s)"
            )
        if n > limit:
            problems.append(f"{task_id}: executed attempt {n} > 1 + max_retries = {limit}")
    if len(runs) > 1:
        names = [e["event"] for e in events]
        last_start = len(names) - 1 - names[::-1].index("started") if attempts else 0
        causes = [name for name in names[:last_start] if name in RERUN_CAUSES]
        if len(causes) < len(runs) - 1:
            problems.append(
                f"{task_id}: executed {len(runs)} times, but its history shows no lease "
                f"expiry, timeout, release or failure before each re-run: {names}"
            )
    return problems


def check_leader_terms(db: Db) -> list[str]:
    """One leader per term: unique terms, elected in order, the holder of the latest leads."""
    problems: list[str] = []
    terms = db.fetch(
        "SELECT term, holder, elected_at FROM conveyor_leader_terms"
        " WHERE name = 'maintenance' ORDER BY term"
    )
    if len({row["term"] for row in terms}) != len(terms):
        problems.append("a leader term was recorded twice")
    problems.extend(
        f"term {after['term']} was elected before term {before['term']}"
        for before, after in itertools.pairwise(terms)
        if after["elected_at"] < before["elected_at"]
    )
    current = db.fetch("SELECT holder, term FROM conveyor_leader WHERE name = 'maintenance'")
    if current and terms:
        leader = (current[0]["term"], current[0]["holder"])
        if leader != (terms[-1]["term"], terms[-1]["holder"]):
            problems.append(f"the leader {leader} does not hold the latest term {terms[-1]}")
    return problems


def check_invariants(db: Db, ledger: Ledger, acked: set[str], *, timeout: float) -> Summary:
    """Check every invariant of the suite; return the counts and every violation found.

    1. Every acknowledged enqueue is in the database and reaches a final state (bounded
       wait of `timeout`); every other task does too (none is stuck).
    2. Each history replays through the state machine (`check_history`): one outcome per
       attempt, nothing after a final state, the row agrees with its history.
    3. Executions (ledger 'start' rows, written by the handlers themselves) each hold their
       own lease and match a 'started' event of the same attempt, and a task runs again only
       after a lease expiry, timeout, release or failure shows in its history.
    4. Attempts never exceed 1 + max_retries (row, history and ledger).
    5. At most one leader per term (`check_leader_terms`).
    """
    wait_all_final(db, acked, timeout)
    tasks = {
        str(row["id"]): row
        for row in db.fetch(
            "SELECT id, state::text AS state, attempt, max_retries FROM conveyor_tasks"
        )
    }
    history: dict[str, list[Any]] = defaultdict(list)
    for row in db.fetch(
        "SELECT task_id::text AS task_id, event, state::text AS state, attempt"
        " FROM conveyor_task_history ORDER BY id"
    ):
        history[row["task_id"]].append(row)
    runs: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in ledger.started():
        runs[row["task_id"]].append(row)

    missing = sorted(acked - set(tasks))
    stuck = sorted(tid for tid, row in tasks.items() if row["state"] not in FINAL_STATES)
    summary = Summary(
        tasks=len(tasks),
        executions=sum(len(rows) for rows in runs.values()),
        duplicates=sum(len(rows) - 1 for rows in runs.values()),
        lost=len(missing) + len(set(stuck) & acked),
    )
    problems = summary.violations
    if missing:
        problems.append(f"{len(missing)} acknowledged task(s) missing: {missing[:5]}")
    if stuck:
        problems.append(f"{len(stuck)} task(s) not final after {timeout:g}s: {stuck[:5]}")
    for task_id, task in tasks.items():
        problems.extend(check_history(task, history.get(task_id, [])))
        problems.extend(check_executions(task, history.get(task_id, []), runs.get(task_id, [])))
    problems.extend(
        f"{tid}: executed but not in the database" for tid in runs.keys() - tasks.keys()
    )
    problems.extend(check_leader_terms(db))
    return summary
