"""Conveyor's workloads for benchmarks/run.py, behind the same contract as the peers.

    .venv/bin/python benchmarks/conveyor_workloads.py --workload w1 --pg-url URL \
        [--redis-url URL] [--tasks N] [--rate R] [--seconds S]

Starts a real `conveyor server --migrate` process on the (fresh, empty) database and, when
the workload needs them, real `conveyor worker apps:worker` processes (benchmarks/apps.py,
a no-op handler). The producer is an AsyncClient in this process. Prints one JSON object on
its last stdout line, as benchmarks/peers/<system>.py do:

- w1: 20,000 no-op tasks enqueued in bulk (batches of 1,000) with no worker running, then
  the workers start; `tasks_per_second` = tasks / (last finished_at - first started_at),
  both read from the database.
- w2: single enqueues at a fixed rate (open loop, as the peers' producers: each call is sent
  at its scheduled time whether or not the previous one has returned, up to 32 at once)
  for S seconds while the workers run, after the peers' warm-up. Paced and stamped by the
  peers' code (peers/common.py): `start_ms` is the p50/p95/p99 from the producer's
  time.time() just before the call to the handler's first line (the `bench.timed` handler
  appends it to a timing file); `finish_ms` runs to finished_at, now() of the transaction
  that records the outcome (its start: the commit follows; PostgreSQL's clock is the
  machine's). `achieved_rate` is the rate sent from first to last send. `steps_ms` splits
  the start latency at the insert's and the claim's transactions (created_at, started_at).
- w3-single: sequential `enqueue_task` calls for S seconds; w3-concurrent: 32 coroutines
  calling `enqueue_task` on one client for S seconds; w3-bulk: `enqueue_tasks` of 1,000
  tasks in a loop for S seconds; w3-single-blocking: w3-single through the blocking
  `Client` (README's example) on a thread, Conveyor only (run.py does not run it; the peers
  have no second client to compare). `tasks_per_second` = tasks acknowledged / elapsed;
  `cpu_us_per_task` splits the CPU the enqueues took between the server, PostgreSQL and
  the producer (this process).
- w4: scale. A backlog of `--queued` tasks (1,000,000; run.py also runs 10,000 to compare),
  then, with the server running:
  - lease latency: a probe in this process registers as a worker and calls the real
    WorkerService.LeaseTasks for 1 task with wait 0, `--probes` times in a row (after a
    warm-up), reporting each success with ReportResults; `lease_ms` is the p50/p95/p99 of
    the LeaseTasks call alone (client clock), with no worker running (`idle`), and again
    back to back for as long as the workers drain (`load`). Every probe must get a task.
  - throughput: the regular worker processes (Cluster.start_workers) drain `--drain` tasks
    (20,000, at most half the backlog; run.py drains 5,000 at both depths) off the
    backlog; `tasks_per_second` = drain / (the drain-th worker finished_at - the first
    worker started_at), database timestamps as in w1.
  - memory: server RSS idle (after the idle probe, workers not started); server and worker
    RSS idle with the workers registered and long-polling while the task type is paused
    (PauseType, so they find nothing), then the peak under the drain once it is resumed.
  - `claim_plan`: EXPLAIN ANALYZE of Conveyor's task_claim (a worker's batch of 64, in a
    transaction rolled back), with the server's generic plan and a custom one, before the
    drain and after it (when the drained tasks' index entries are dead at the head of the
    queue), summed up as the scan that finds the candidates, its buffers and the time.
  The backlog is built with SQL, not with EnqueueTasks: a million tasks through the bulk
  RPC would take minutes before the measurement starts. It is the same rows all the same:
  it runs Conveyor's own enqueue statement (task_insert_many from queries.sql, through
  benchmarks/conveyor_sql.py) with server-made arrays of 50,000 tasks as a bare
  Task(type="bench.noop") sends them (UUIDv7 ids, empty payload, default timeout and
  retries; like the server's, it writes no history row), on one connection per core; then
  VACUUM ANALYZE, the state autovacuum would bring a table that has been filled over time
  to, and a CHECKPOINT, so the build's dirty pages are not written during the measurement.

Extra keys (process RSS in MiB, the achieved rate) are informational; run.py keeps them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import asyncpg
import grpc

from conveyor import AsyncClient, Client, Task, __version__
from conveyor.client.channel import CHANNEL_OPTIONS
from conveyor.protocol import convert
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server.worker_service import LEASE_BYTES_BESIDES
from conveyor.storage.queries import SQL

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import conveyor_sql  # noqa: E402 - benchmarks/ is not a package
from apps import NOOP_TYPE, TIMED_TYPE  # noqa: E402
from peers import common  # noqa: E402
from peers.common import percentiles  # noqa: E402 - nearest rank, as the peers report

if TYPE_CHECKING:
    from collections.abc import Callable

CONVEYOR = Path(sys.executable).parent / "conveyor"
WORKLOADS = ("w1", "w2", "w3-single", "w3-single-blocking", "w3-concurrent", "w3-bulk", "w4")
BULK_BATCH = 1000
PRODUCERS = 32
# As many worker processes as every peer runs (peers/common.py), each with this many slots.
DEFAULT_WORKER_PROCESSES = common.WORKER_PROCESSES
DEFAULT_CONCURRENCY = 64
START_TIMEOUT = 60.0
# W4: tasks per backlog statement (one transaction each); the probe and the drain.
BACKLOG_CHUNK = 50_000
PROBE_WARMUP = 20
DRAIN_POLL = 0.25
DRAIN_STALL = 30.0  # seconds without a finished task before a W4 drain is declared stuck
MIN_LOAD_PROBES = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float | None:
    """Resident set size of one process, from /proc (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used, from /proc (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command's closing parenthesis, utime and stime are the 12th and 13th fields.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def postgres_cpu_seconds() -> float:
    """CPU used by every live `postgres` process on the machine (the benchmark's cluster)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    total += cpu_seconds(int(entry.name))
    return total


def cpu_per_task(before: dict[str, float], after: dict[str, float], tasks: int) -> dict[str, float]:
    """Microseconds of CPU per task, by process group, between two `Cluster.cpu()` reads."""
    return {name: round((after[name] - before[name]) / tasks * 1e6, 1) for name in before}


def is_ready(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
        return bool(response.status == 200)
    return False


class Cluster:
    """A `conveyor server` process and, on demand, `conveyor worker` processes."""

    def __init__(self, pg_url: str, logs: Path, server_args: list[str] | None = None) -> None:
        self.pg_url = pg_url
        # Extra `conveyor server` flags, to measure one lever at a time (--no-group-commit).
        self.server_args = server_args or []
        self.logs = logs
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        self._files.append(log)
        return subprocess.Popen(
            argv, cwd=BENCH_DIR, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def start_server(self) -> None:
        self.server = self._spawn(
            "server",
            [
                str(CONVEYOR),
                "server",
                "--database-url",
                self.pg_url,
                "--migrate",
                "--no-dashboard",
                "--grpc-listen",
                self.address,
                "--http-listen",
                f"127.0.0.1:{self.http_port}",
                *self.server_args,
            ],
        )
        deadline = time.monotonic() + START_TIMEOUT
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"conveyor server exited:\n{self.tail('server')}")
            if await asyncio.to_thread(is_ready, url):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"conveyor server not ready in {START_TIMEOUT}s:\n{self.tail('server')}")

    async def start_workers(self, client: AsyncClient, processes: int, concurrency: int) -> None:
        for index in range(processes):
            self.workers.append(
                self._spawn(
                    f"worker-{index}",
                    [
                        str(CONVEYOR),
                        "worker",
                        "apps:worker",
                        "--server",
                        self.address,
                        "--concurrency",
                        str(concurrency),
                    ],
                )
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for index, process in enumerate(self.workers):
                if process.poll() is not None:
                    raise RuntimeError(f"worker {index} exited:\n{self.tail(f'worker-{index}')}")
            # Ours by pid: other registered workers (W4's probe) must not count.
            pids = {process.pid for process in self.workers}
            running = [
                w for w in await client.list_workers() if w.state == "active" and w.pid in pids
            ]
            if len(running) >= len(self.workers):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"workers not registered in {START_TIMEOUT}s:\n{self.tail('worker-0')}")

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the server, the workers together, and PostgreSQL."""
        return {
            "server": cpu_seconds(self.server.pid) if self.server else 0.0,
            "workers": sum(cpu_seconds(w.pid) for w in self.workers),
            "postgres": postgres_cpu_seconds(),
        }

    def rss(self) -> dict[str, float | None]:
        """Server RSS and the largest worker RSS, in MiB."""
        worker_rss = [rss_mib(w.pid) for w in self.workers]
        known = [value for value in worker_rss if value is not None]
        return {
            "server_rss_mib": rss_mib(self.server.pid) if self.server else None,
            "worker_rss_mib": max(known) if known else None,
        }

    @staticmethod
    def _terminate(group: list[subprocess.Popen[bytes]]) -> None:
        for process in group:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in group:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_workers(self) -> None:
        """Stop the workers gracefully (they finish and report what they hold)."""
        self._terminate(self.workers)

    def stop(self) -> None:
        # Workers first, while the server can still take their handed-back leases.
        self._terminate(self.workers)
        self._terminate([self.server] if self.server else [])
        for log in self._files:
            log.close()


def peak(samples: list[dict[str, float | None]], key: str) -> float | None:
    """The largest of the RSS samples' `key` (None when no sample has it)."""
    values = [value for sample in samples if (value := sample[key]) is not None]
    return max(values) if values else None


async def wait_finished(conn: asyncpg.Connection, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = await conn.fetchval(
            "SELECT count(*) FROM conveyor_tasks WHERE finished_at IS NOT NULL"
        )
        if done >= expected:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"only {done} of {expected} tasks finished within {timeout:.0f}s")


async def w1(
    cluster: Cluster, conn: asyncpg.Connection, args: argparse.Namespace
) -> dict[str, Any]:
    async with AsyncClient(cluster.address) as client:
        for start in range(0, args.tasks, BULK_BATCH):
            count = min(BULK_BATCH, args.tasks - start)
            await client.enqueue_tasks([Task(type=NOOP_TYPE) for _ in range(count)])
        await cluster.start_workers(client, args.worker_processes, args.concurrency)
        # Postgres backends that exit during the drain take their CPU with them, but the
        # server's pool and the workers' connections live through it.
        cpu_before = cluster.cpu()
        samples: list[dict[str, float | None]] = []
        deadline = time.monotonic() + args.timeout
        while True:
            samples.append(cluster.rss())
            # Whether any task is left, not how many are done: a count of the finished
            # rows read the whole table every poll (10 ms of PostgreSQL's CPU each, 5 % of
            # a core, taken from the drain it measures), where the peers' harness reads a
            # file. This stops at the first unfinished task it finds in (state, seq).
            left = await conn.fetchval(
                "SELECT EXISTS (SELECT FROM conveyor_tasks "
                "WHERE state IN ('queued', 'scheduled', 'running'))"
            )
            if not left:
                break
            if time.monotonic() > deadline:
                done = await conn.fetchval(
                    "SELECT count(*) FROM conveyor_tasks WHERE finished_at IS NOT NULL"
                )
                raise RuntimeError(f"only {done} of {args.tasks} tasks finished in time")
            await asyncio.sleep(0.2)
        cpu_after = cluster.cpu()
    row = await conn.fetchrow(
        "SELECT min(started_at) AS first, max(finished_at) AS last,"
        " count(*) FILTER (WHERE state = 'succeeded') AS ok FROM conveyor_tasks"
    )
    assert row is not None  # an aggregate always returns its row
    if row["ok"] != args.tasks:
        # The drain stops when nothing is left to run: a failed task must not pass as drained.
        raise RuntimeError(f"{row['ok']} of {args.tasks} tasks succeeded")
    elapsed = (row["last"] - row["first"]).total_seconds()
    return {
        "tasks_per_second": round(args.tasks / elapsed, 1),
        "succeeded": row["ok"],
        "drain_seconds": round(elapsed, 3),
        # CPU per drained task, by process group (includes up to one 0.2 s poll of idling).
        "cpu_us_per_task": cpu_per_task(cpu_before, cpu_after, args.tasks),
        "load_server_rss_mib": peak(samples, "server_rss_mib"),
        "load_worker_rss_mib": peak(samples, "worker_rss_mib"),
    }


async def w2(
    cluster: Cluster, conn: asyncpg.Connection, args: argparse.Namespace
) -> dict[str, Any]:
    with common.timing_file() as timings:
        async with AsyncClient(cluster.address) as client:
            # The workers inherit the timing file's path (common.TIMING_ENV).
            await cluster.start_workers(client, args.worker_processes, args.concurrency)
            # The peers' warm-up (peers/common.py): timed tasks with ids below zero.
            warm = await client.enqueue_tasks(
                [
                    Task(type=TIMED_TYPE, payload=str(index).encode())
                    for index in range(-common.WARM_UP_TASKS, 0)
                ]
            )
            await wait_finished(conn, len(warm), common.WARM_UP_TIMEOUT)
            await asyncio.sleep(common.WARM_UP_SETTLE)
            idle = cluster.rss()
            ids: list[str] = []

            async def send(index: int) -> None:
                task = Task(type=TIMED_TYPE, payload=str(index).encode())
                ids.append(await client.enqueue_task(task))

            cpu_before = cluster.cpu()
            producer_before = time.process_time()
            # Paced, stamped and bounded as the peers are (peers/common.py): open loop, up to
            # W2_IN_FLIGHT calls at once, each stamped just before it starts.
            sent = await common.paced_async(args.rate, args.seconds, send)
            enqueued_at = sent.enqueued_at
            total = len(enqueued_at)
            await wait_finished(conn, len(warm) + total, common.POST_LOAD_WAIT)
            cpu_after = cluster.cpu()
            cpu_after["producer"] = time.process_time() - producer_before
            cpu_before["producer"] = 0.0
            reader = common.TimingReader(timings)
            ran = reader.read()
    rows = await conn.fetch(
        "SELECT payload, extract(epoch FROM created_at) AS created,"
        " extract(epoch FROM started_at) AS started, extract(epoch FROM finished_at) AS finished"
        " FROM conveyor_tasks WHERE id = ANY($1::uuid[])",
        ids,
    )
    stamps = {
        int(r["payload"]): (float(r["created"]), float(r["started"]), float(r["finished"]))
        for r in rows
    }
    finished = {index: stamp[2] for index, stamp in stamps.items()}

    def step(first: Callable[[int], float], then: Callable[[int], float]) -> dict[str, float]:
        return percentiles([(then(i) - first(i)) * 1000 for i in enqueued_at])

    return {
        # What the peers report: the producer's clock just before the call, to the
        # handler's first line (start) and to finished_at (finish: the start of the
        # outcome's transaction; the peers' finish is their function's return, earlier).
        "start_ms": percentiles([(ran[i][0] - at) * 1000 for i, at in enqueued_at.items()]),
        "finish_ms": percentiles([(finished[i] - at) * 1000 for i, at in enqueued_at.items()]),
        # Where the start latency goes (the database's clock is the machine's): the call
        # to the insert's transaction, that to the claim's, and the claim to the handler.
        "steps_ms": {
            "call_to_insert": step(enqueued_at.__getitem__, lambda i: stamps[i][0]),
            "insert_to_claim": step(lambda i: stamps[i][0], lambda i: stamps[i][1]),
            "claim_to_handler": step(lambda i: stamps[i][1], lambda i: ran[i][0]),
        },
        "tasks": len(rows),
        "duplicates": reader.duplicates,
        "achieved_rate": sent.achieved_rate,
        "worst_late_ms": round(sent.worst_late * 1000, 1),
        # CPU per task while the load ran, by process group (the producer is this process).
        "cpu_us_per_task": cpu_per_task(cpu_before, cpu_after, total),
        "idle_server_rss_mib": idle["server_rss_mib"],
        "idle_worker_rss_mib": idle["worker_rss_mib"],
    }


def enqueue_blocking_until(client: Client, until: float) -> int:
    """w3-single through the blocking client, until `time.monotonic()` reaches `until`.

    Run on a thread of its own, as a web app's request handler would call it.
    """
    count = 0
    while time.monotonic() < until:
        client.enqueue_task(Task(type=NOOP_TYPE))
        count += 1
    return count


async def enqueue_until(
    workload: str, client: AsyncClient, blocking_client: Client | None, deadline: float
) -> int:
    """Enqueue as `workload` says until the loop's clock reaches `deadline`; how many."""
    loop = asyncio.get_running_loop()

    async def single() -> int:
        count = 0
        while loop.time() < deadline:
            await client.enqueue_task(Task(type=NOOP_TYPE))
            count += 1
        return count

    async def bulk() -> int:
        count = 0
        while loop.time() < deadline:
            await client.enqueue_tasks([Task(type=NOOP_TYPE) for _ in range(BULK_BATCH)])
            count += BULK_BATCH
        return count

    if workload == "w3-single":
        return await single()
    if workload == "w3-concurrent":
        return sum(await asyncio.gather(*(single() for _ in range(PRODUCERS))))
    if workload == "w3-single-blocking":
        if blocking_client is None:
            raise ValueError("w3-single-blocking needs a blocking Client")
        until = time.monotonic() + (deadline - loop.time())
        return await asyncio.to_thread(enqueue_blocking_until, blocking_client, until)
    return await bulk()


async def w3(
    cluster: Cluster, conn: asyncpg.Connection, args: argparse.Namespace
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    async with AsyncClient(cluster.address) as client, contextlib.AsyncExitStack() as closing:
        await client.enqueue_task(Task(type=NOOP_TYPE))  # opens the channel
        blocking_client = None
        if args.workload == "w3-single-blocking":
            blocking_client = closing.enter_context(Client(cluster.address))
            await asyncio.to_thread(blocking_client.enqueue_task, Task(type=NOOP_TYPE))
        before = await conn.fetchval("SELECT count(*) FROM conveyor_tasks")
        cpu_before = cluster.cpu()
        producer_before = time.process_time()
        started = loop.time()
        done = await enqueue_until(args.workload, client, blocking_client, started + args.seconds)
        elapsed = loop.time() - started
        cpu_after = cluster.cpu()
        cpu_after["producer"] = time.process_time() - producer_before
        cpu_before["producer"] = 0.0
    stored = await conn.fetchval("SELECT count(*) FROM conveyor_tasks") - before
    if stored != done:
        raise RuntimeError(f"{done} enqueues acknowledged but {stored} tasks stored")
    return {
        "tasks_per_second": round(done / elapsed, 1),
        "tasks": done,
        # Where the enqueues' CPU went, by process group (the producer is this process).
        "cpu_us_per_task": cpu_per_task(cpu_before, cpu_after, done),
    }


# --- W4: scale ------------------------------------------------------------------------------


async def build_backlog(pg_url: str, queued: int) -> float:
    """`queued` tasks through Conveyor's own insert statement; returns the seconds it took.

    Chunks of BACKLOG_CHUNK, one transaction each, spread over one connection per core:
    the insert is CPU-bound in PostgreSQL (the index entries of every task).
    """
    chunks = [min(BACKLOG_CHUNK, queued - start) for start in range(0, queued, BACKLOG_CHUNK)]
    started = time.monotonic()

    async def insert(conn: asyncpg.Connection) -> None:
        while chunks:
            count = chunks.pop()
            await conn.execute(conveyor_sql.insert_many(NOOP_TYPE, str(count)))

    conns = [await asyncpg.connect(pg_url) for _ in range(max(1, os.cpu_count() or 1))]
    try:
        await asyncio.gather(*(insert(conn) for conn in conns))
        for table in ("conveyor_tasks", "conveyor_task_events"):
            await conns[0].execute(f"VACUUM ANALYZE {table}")
        # The build leaves about a gigabyte of WAL and dirty pages per million tasks: flush
        # them now, or the checkpoint they trigger lands in the measurement.
        await conns[0].execute("CHECKPOINT")
    finally:
        for conn in conns:
            await conn.close()
    return round(time.monotonic() - started, 1)


class LeaseProbe:
    """A worker of one slot made of bare RPCs: times LeaseTasks, then reports the success."""

    def __init__(self, address: str) -> None:
        self.worker_id = f"w4-probe-{os.getpid()}"
        self.leased = 0  # tasks this probe leased and reported: not part of the workers' drain
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.WorkerServiceStub(self.channel)
        self.lease_request = pb.LeaseTasksRequest(
            worker_id=self.worker_id,
            task_types=[NOOP_TYPE],
            max_tasks=1,
            wait=convert.duration(timedelta(0)),
        )

    async def register(self) -> None:
        """Register (again: a probe silent for long is swept as lost; this revives it)."""
        await self.stub.RegisterWorker(
            pb.RegisterWorkerRequest(
                worker_id=self.worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                task_types=[NOOP_TYPE],
                concurrency=1,
                version=__version__,
            ),
            timeout=10,
        )

    async def once(self) -> float:
        """One lease of one task, in milliseconds; the task is then reported succeeded."""
        started = time.perf_counter()
        response = await self.stub.LeaseTasks(self.lease_request, timeout=10)
        elapsed = (time.perf_counter() - started) * 1000
        if len(response.leases) != 1:
            raise RuntimeError(f"the probe leased {len(response.leases)} tasks, expected 1")
        lease = response.leases[0]
        self.leased += 1
        report = pb.ReportResultRequest(
            worker_id=self.worker_id,
            task_id=lease.task_id,
            lease_id=lease.lease_id,
            outcome=pb.OUTCOME_SUCCEEDED,
        )
        answer = await self.stub.ReportResults(
            pb.ReportResultsRequest(worker_id=self.worker_id, reports=[report]), timeout=10
        )
        if answer.outcomes[0].code != 0:
            raise RuntimeError(f"the probe's report was refused: {answer.outcomes[0].message}")
        return elapsed

    async def run(self, count: int) -> list[float]:
        """`count` leases back to back, after a warm-up; their latencies."""
        for _ in range(PROBE_WARMUP):
            await self.once()
        return [await self.once() for _ in range(count)]

    async def run_until(self, stop: asyncio.Event) -> list[float]:
        """Leases back to back until `stop` is set; their latencies."""
        samples = []
        while not stop.is_set():
            samples.append(await self.once())
        return samples

    async def close(self) -> None:
        await self.channel.close(grace=None)


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", []):
        found += _plan_nodes(child)
    return found


async def claim_plan(conn: asyncpg.Connection, limit: int) -> dict[str, Any]:
    """EXPLAIN ANALYZE of task_claim as the server runs it, rolled back, summed up.

    The server's statements are prepared (asyncpg), so after five runs PostgreSQL may switch
    to a generic plan: both the generic and a custom plan are shown. The types are those the
    workers ask for (apps.py handles two, and W4 queues only one): a plan that scans one
    type's backlog to find another's shows here (migration 0011 says how it once did).
    """
    await conn.execute(f"PREPARE w4_claim AS {SQL['task_claim']}")
    summary: dict[str, Any] = {"limit": limit}
    try:
        for mode in ("generic", "custom"):
            transaction = conn.transaction()
            await transaction.start()
            try:
                await conn.execute(f"SET LOCAL plan_cache_mode = force_{mode}_plan")
                types = ", ".join(map(conveyor_sql.sql_literal, (NOOP_TYPE, TIMED_TYPE)))
                raw = await conn.fetchval(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE w4_claim("
                    f"ARRAY[{types}], {limit}, 'w4-explain',"
                    f" {conveyor_sql.LEASE_TTL_S}, {conveyor_sql.DEADLINE_GRACE_S},"
                    f" {conveyor_sql.LEASE_MESSAGE_BYTES}, {LEASE_BYTES_BESIDES})"
                )
            finally:
                # The plan is what is measured: the tasks it claimed stay queued.
                await transaction.rollback()
            summary[mode] = summarize_plan(json.loads(raw) if isinstance(raw, str) else raw)
    finally:
        await conn.execute("DEALLOCATE w4_claim")
    return summary


def summarize_plan(explained: list[dict[str, Any]]) -> dict[str, Any]:
    """The scan that finds the claim's candidates, its buffers, and the statement's times."""
    top = explained[0]
    nodes = _plan_nodes(top["Plan"])
    candidates = next((n for n in nodes if n.get("Subplan Name") == "CTE candidates"), top["Plan"])
    scan = next(
        (n for n in _plan_nodes(candidates) if n.get("Relation Name") == "conveyor_tasks"), {}
    )
    return {
        "scan": " ".join(part for part in (scan.get("Node Type"), scan.get("Index Name")) if part),
        "scan_rows": scan.get("Actual Rows"),
        "scan_rows_removed": scan.get("Rows Removed by Filter", 0),
        "scan_buffers": scan.get("Shared Hit Blocks", 0) + scan.get("Shared Read Blocks", 0),
        "buffers": top["Plan"].get("Shared Hit Blocks", 0)
        + top["Plan"].get("Shared Read Blocks", 0),
        "planning_ms": round(top.get("Planning Time", 0.0), 3),
        "execution_ms": round(top.get("Execution Time", 0.0), 3),
    }


async def drain_under_load(
    cluster: Cluster,
    conn: asyncpg.Connection,
    client: AsyncClient,
    probe: LeaseProbe,
    args: argparse.Namespace,
) -> tuple[list[float], list[dict[str, float | None]]]:
    """Resume the paused type; probe leases back to back while the workers drain.

    Returns the probe's latencies and the RSS samples taken meanwhile.
    """
    drain = args.drain
    succeeded_before = await conn.fetchval(
        "SELECT count(*) FROM conveyor_tasks WHERE state = 'succeeded'"
    )
    probed_before = probe.leased
    await client.resume_type(NOOP_TYPE)
    # As many probes as the drain lasts for, back to back: one call in flight.
    stop_probing = asyncio.Event()
    loaded = asyncio.create_task(probe.run_until(stop_probing))
    samples: list[dict[str, float | None]] = []
    deadline = time.monotonic() + args.timeout
    last, progress_at = -1, time.monotonic()
    while True:
        samples.append(cluster.rss())
        done = await conn.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'succeeded'")
        # The probe's own successes are not the workers' drain.
        drained = done - succeeded_before - (probe.leased - probed_before)
        if drained >= drain or loaded.done():
            break
        now = time.monotonic()
        if drained != last:
            last, progress_at = drained, now
        if now > deadline or now - progress_at > DRAIN_STALL:
            stop_probing.set()
            raise RuntimeError(f"only {drained} of {drain} tasks drained in time")
        await asyncio.sleep(DRAIN_POLL)
    stop_probing.set()
    load_ms = await loaded  # raises if a probe failed
    if len(load_ms) < MIN_LOAD_PROBES:
        raise RuntimeError(f"only {len(load_ms)} lease probes under load: drain more (--drain)")
    return load_ms, samples


async def w4(
    cluster: Cluster, conn: asyncpg.Connection, args: argparse.Namespace
) -> dict[str, Any]:
    build_seconds = await build_backlog(args.pg_url, args.queued)
    queued = await conn.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'queued'")
    if queued != args.queued:
        raise RuntimeError(f"the backlog holds {queued} queued tasks, not {args.queued}")
    plan_before = await claim_plan(conn, args.concurrency)
    probe = LeaseProbe(cluster.address)
    try:
        await probe.register()
        idle_ms = await probe.run(args.probes)
        idle_server = cluster.rss()["server_rss_mib"]
        async with AsyncClient(cluster.address) as client:
            # Workers registered and long-polling, with nothing they may lease: idle.
            await client.pause_type(NOOP_TYPE, reason="w4: idle memory")
            await cluster.start_workers(client, args.worker_processes, args.concurrency)
            await asyncio.sleep(1.0)
            idle = cluster.rss()
            await probe.register()
            load_ms, samples = await drain_under_load(cluster, conn, client, probe, args)
        cluster.stop_workers()
    finally:
        await probe.close()
    row = await conn.fetchrow(
        "SELECT min(started_at) AS first, (SELECT finished_at FROM conveyor_tasks"
        "  WHERE state = 'succeeded' AND worker_id <> $1"
        "  ORDER BY finished_at OFFSET $2 - 1 LIMIT 1) AS last"
        " FROM conveyor_tasks WHERE state = 'succeeded' AND worker_id <> $1",
        probe.worker_id,
        args.drain,
    )
    if row is None or row["last"] is None:
        raise RuntimeError(f"fewer than {args.drain} tasks finished by the workers")
    elapsed = (row["last"] - row["first"]).total_seconds()
    plan_after = await claim_plan(conn, args.concurrency)

    return {
        "queued": args.queued,
        "backlog_build_seconds": build_seconds,
        "lease_ms": {"idle": percentiles(idle_ms), "load": percentiles(load_ms)},
        "probes": {"idle": len(idle_ms), "load": len(load_ms)},
        "tasks_per_second": round(args.drain / elapsed, 1),
        "drained": args.drain,
        "drain_seconds": round(elapsed, 3),
        "idle_server_rss_mib": idle_server,
        "idle_workers_server_rss_mib": idle["server_rss_mib"],
        "idle_worker_rss_mib": idle["worker_rss_mib"],
        "load_server_rss_mib": peak(samples, "server_rss_mib"),
        "load_worker_rss_mib": peak(samples, "worker_rss_mib"),
        "claim_plan": {"before_drain": plan_before, "after_drain": plan_after},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as logs:
        cluster = Cluster(args.pg_url, Path(logs), args.server_arg)
        try:
            await cluster.start_server()
            conn = await asyncpg.connect(args.pg_url)
            try:
                if args.workload == "w1":
                    return await w1(cluster, conn, args)
                if args.workload == "w2":
                    return await w2(cluster, conn, args)
                if args.workload == "w4":
                    return await w4(cluster, conn, args)
                return await w3(cluster, conn, args)
            finally:
                await conn.close()
        except Exception:
            for name in ("server", "worker-0", "worker-1"):
                text = cluster.tail(name, 15)
                if text:
                    print(f"--- {name} log ---\n{text}", file=sys.stderr)
            raise
        finally:
            cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=WORKLOADS, required=True)
    parser.add_argument("--pg-url", required=True)
    parser.add_argument("--redis-url", default=None, help="Accepted for the contract; unused.")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--worker-processes", type=int, default=DEFAULT_WORKER_PROCESSES)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--timeout", type=float, default=600.0, help="Bound on a W1/W4 drain.")
    parser.add_argument("--queued", type=int, default=1_000_000, help="W4 backlog.")
    parser.add_argument(
        "--probes",
        type=int,
        default=300,
        help="W4 idle lease probes (under load: while it drains).",
    )
    parser.add_argument(
        "--drain",
        type=int,
        default=None,
        help="W4 tasks drained by the workers (default 20,000, at most half the backlog).",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="A `conveyor server` flag, e.g. --server-arg=--no-group-commit (repeatable).",
    )
    args = parser.parse_args()
    if args.drain is None:
        args.drain = min(20_000, args.queued // 2)
    if args.workload == "w4" and args.drain + args.probes + PROBE_WARMUP > args.queued * 3 // 4:
        # The drain and the probes must leave a backlog: the depth is what is measured.
        parser.error("--drain + --probes must stay within three quarters of --queued")
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
