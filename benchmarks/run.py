"""Conveyor against its peers, on the same machine in the same run.

    make bench                                   # the full run (median of 3)
    .venv/bin/python benchmarks/run.py --quick   # a short smoke run (1 repeat, short loads)
    .venv/bin/python benchmarks/run.py --systems conveyor --workloads w1,w3-bulk

Starts its own infrastructure: a throwaway PostgreSQL 15 cluster with durable defaults
(fsync and synchronous_commit on), through scripts/with-postgres15.sh (this script re-runs
itself under it), and a redis-server on a free loopback port (Debian's; installed with
apt-get when missing and running as root). Every system gets a fresh database
(CREATE DATABASE) and an empty Redis (FLUSHALL) for every run of every workload.

Each system runs as a subprocess behind one contract, so the numbers come from the same
definitions:

    .venv/bin/python benchmarks/peers/<system>.py --workload {w1,w2,w3-single,w3-concurrent,
        w3-bulk} --pg-url URL --redis-url URL [--tasks N] [--rate R] [--seconds S]

prints one JSON object on its last stdout line: `{"tasks_per_second": x}` (w1, w3-*),
`{"start_ms": {"p50", "p95", "p99"}, "finish_ms": {...}, "achieved_rate": sends/s}` (w2,
with `lost` when tasks did not run), or `{"unsupported": why}`. Conveyor's own side is
benchmarks/conveyor_workloads.py (its docstring defines the workloads). A system whose
script is missing or fails is shown as n/a with the error; a W2 run that lost tasks counts
as failed, and a W2 row that sent below 95% of its rate is marked with a footnote.

Workloads: W1 end to end (20,000 no-op tasks enqueued in bulk, then drained; first start
to last finish), W2 latency (one task per call at 200/s and 1,000/s while workers run,
every producer open loop; enqueue->start and enqueue->finish percentiles), W3 enqueue
(sequential single calls, 32 concurrent single-task producers, the bulk API). Prints a
table per workload, with each value's median and spread over the repeats and the ratio to
Conveyor, and writes benchmarks/results/latest.json.

One row has fewer peers: `burst`, W1 with `--burst-tasks` (150,000) tasks, run by Conveyor
and PgQueuer only (Procrastinate, Celery and Dramatiq would take minutes a run). It finds
what a 20,000-task drain is too short to meet: the claim on statistics taken before the
burst, and the dead index entries of a long drain (docs/performance.md, the ninth and tenth
rounds).

Three more rows are Conveyor's (or the database's, or the design's) alone, with no peer:

- `w3-floor` (part of `--workloads w3`): benchmarks/enqueue_floor.py, the floor under W3
  single. A bare grpc.aio stream server that runs Conveyor's one-task insert for each
  message, with none of Conveyor's machinery, fed one request at a time: the most any
  design with a Python gRPC server in front of PostgreSQL can do here. It also times the
  floor's two parts alone, the transport (a message each way) and the insert with its
  commit (asyncpg, no gRPC): their sum is the bound, what such a server would do with no
  code at all between the two. The report gives Conveyor's W3 single and the sequential
  target as fractions of the floor and of the bound.

- W4 scale (`w4-10k`, `w4-1m`; `--workloads w4` selects both): conveyor_workloads.py
  `--workload w4` with 10,000 and then `--w4-queued` (1,000,000) tasks queued: LeaseTasks
  latency idle and under load, the drain rate of the same `--w4-drain` tasks (5,000, half
  the small backlog) at both depths, server and worker RSS, and the claim's plan. The
  table gives the 1M / 10k ratio of the lease p50 (target: at most 1.5x).
- `pgbench`: benchmarks/pgbench_limit.py, PostgreSQL's own limit for Conveyor's enqueue,
  claim and complete statements (single-row and in batches of 100), and Conveyor's W1 as a
  fraction of the batched limit (stretch target: two thirds) when W1 ran in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from peers.common import W2_IN_FLIGHT, WORKER_PROCESSES
from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
WITH_PG = REPO / "scripts" / "with-postgres15.sh"
INSIDE_ENV = "CONVEYOR_BENCH_INSIDE_PG"

SYSTEMS = ("conveyor", "pgqueuer", "procrastinate", "celery", "dramatiq")
REDIS_SYSTEMS = ("celery", "dramatiq")

console = Console(width=160)


@dataclass(frozen=True)
class Workload:
    """One row group of the report: which contract workload, with which arguments."""

    key: str
    contract: str
    title: str
    kind: str  # "throughput", "latency", "scale" (W4) or "limit" (pgbench)
    target: str
    # The only systems that run it (None: every selected system). The pseudo-systems
    # ("postgresql", the database alone; "grpc-floor") run whatever --systems says.
    only: tuple[str, ...] | None = None


WORKLOADS = {
    w.key: w
    for w in (
        Workload(
            "w1",
            "w1",
            "W1 end to end: {tasks:,} no-op tasks enqueued in bulk, then drained (tasks/s)",
            "throughput",
            "target: >= 1.0x PgQueuer",
        ),
        Workload(
            "burst",
            "w1",
            "W1 after a burst: {burst_tasks:,} no-op tasks enqueued in bulk, then drained "
            "(tasks/s)",
            "throughput",
            "no target: W1's 20,000 drain in a few seconds, before a burst's statistics and "
            "dead index entries weigh on the claim; the peers that would take minutes sit out",
            only=("conveyor", "pgqueuer"),
        ),
        Workload(
            "w2-200",
            "w2",
            "W2 latency at 200/s for {w2_seconds:g} s (ms)",
            "latency",
            "target: start p50 <= 2 ms, p99 <= 10 ms",
        ),
        Workload(
            "w2-1000",
            "w2",
            "W2 latency at 1,000/s for {w2_seconds:g} s (ms)",
            "latency",
            "",
        ),
        Workload(
            "w3-single",
            "w3-single",
            "W3 sequential single enqueue calls for {w3_seconds:g} s (tasks/s)",
            "throughput",
            "target: >= 2,000/s",
        ),
        Workload(
            "w3-concurrent",
            "w3-concurrent",
            "W3 32 concurrent single-task producers for {w3_seconds:g} s (tasks/s)",
            "throughput",
            "target: >= 10,000/s",
        ),
        Workload(
            "w3-bulk",
            "w3-bulk",
            "W3 bulk enqueue for {w3_seconds:g} s (tasks/s)",
            "throughput",
            "target: >= 1.2x PgQueuer's bulk",
        ),
        Workload(
            "w3-floor",
            "floor",
            "The floor under W3 single: a bare gRPC stream server running Conveyor's insert",
            "limit",
            "no design with a Python gRPC server in front of PostgreSQL enqueues one task at a "
            "time faster than this floor, nor faster than the bound (the transport's and the "
            "commit's times alone, added, as if no code ran between them); the sequential "
            "target (2,000/s) is compared to both",
            only=("grpc-floor",),
        ),
        Workload(
            "w4-10k",
            "w4",
            "W4 scale with 10,000 tasks queued",
            "scale",
            "",
            only=("conveyor",),
        ),
        Workload(
            "w4-1m",
            "w4",
            "W4 scale with {w4_queued:,} tasks queued",
            "scale",
            "target: lease latency at 1M queued within 1.5x of that at 10k",
            only=("conveyor",),
        ),
        Workload(
            "pgbench",
            "pgbench",
            "PostgreSQL limit (pgbench, Conveyor's statements)",
            "limit",
            "stretch target: Conveyor's W1 >= two thirds of the batched limit",
            only=("postgresql",),
        ),
    )
}
W4_SMALL = 10_000
# A W2 run that sent below this fraction of its target rate is marked: its latencies are
# those of a lighter load than the row's title says.
W2_RATE_TOLERANCE = 0.95
# An adapter's own --timeout is the harness's bound less this margin, so it stops itself and
# its workers (which run in their own sessions, out of reach of the harness's kill) first.
ADAPTER_TIMEOUT_MARGIN = 60.0
# On the bound, an adapter gets SIGTERM (it stops its workers, up to 15 s) before SIGKILL.
TERMINATE_GRACE = 20.0
W4_TARGET = 1.5  # the issue: lease latency at 1M queued within 1.5x of that at 10k
POSTGRESQL = "postgresql"  # the pseudo-system of the pgbench row: the database alone
# The pseudo-system of the w3-floor row: Conveyor's transport and insert without Conveyor.
FLOOR = "grpc-floor"
PSEUDO_SYSTEMS = (POSTGRESQL, FLOOR)
W3_SINGLE_TARGET = 2000.0
LATENCY_PERCENTILES = ("p50", "p95", "p99")


# --- Infrastructure ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reexec_under_postgres() -> None:
    """Run this same command again inside scripts/with-postgres15.sh (never returns)."""
    env = {**os.environ, INSIDE_ENV: "1"}
    argv = [str(WITH_PG), sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    os.execve(str(WITH_PG), argv, env)  # noqa: S606 - our own script, fixed arguments


def ensure_redis_server() -> str | None:
    """The redis-server binary, installing Debian's package when missing (root only)."""
    found = shutil.which("redis-server")
    if found or os.geteuid() != 0:
        return found
    console.print("[yellow]redis-server missing: apt-get install -y redis-server[/]")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "redis-server"]
    if subprocess.run(install, env=env, check=False, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False, capture_output=True)
        subprocess.run(install, env=env, check=False, capture_output=True)
    return shutil.which("redis-server")


class Redis:
    """A redis-server with its default settings on a free loopback port, data in a temp dir."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="conveyor-bench-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.command("PING") == "+PONG":
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def command(self, *words: str) -> str:
        """Send one command in RESP; return the first reply line."""
        payload = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload.encode())
            return sock.recv(65536).decode(errors="replace").split("\r\n", 1)[0]

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, check=False).stdout
        return next((w[2:] for w in out.decode().split() if w.startswith("v=")), "?")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def database_url(base: str, name: str) -> str:
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def admin(base_url: str, sql: str) -> Any:
    conn = await asyncpg.connect(base_url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


# --- Running one system on one workload ----------------------------------------------------


def script_for(system: str) -> Path:
    if system == POSTGRESQL:
        return BENCH_DIR / "pgbench_limit.py"
    if system == FLOOR:
        return BENCH_DIR / "enqueue_floor.py"
    if system == "conveyor":
        return BENCH_DIR / "conveyor_workloads.py"
    return BENCH_DIR / "peers" / f"{system}.py"


def contract_args(workload: Workload, args: argparse.Namespace) -> tuple[list[str], float]:
    """The contract's arguments for this workload, and a bound on the whole run."""
    if workload.contract == "w1":
        tasks = args.burst_tasks if workload.key == "burst" else args.tasks
        return ["--tasks", str(tasks)], args.w1_timeout
    if workload.contract == "w2":
        rate = f"{w2_rate(workload):g}"
        return ["--rate", rate, "--seconds", f"{args.w2_seconds:g}"], args.w2_seconds + 240
    if workload.contract == "w4":
        queued = W4_SMALL if workload.key == "w4-10k" else args.w4_queued
        extra = ["--queued", str(queued), "--drain", str(args.w4_drain)]
        # The backlog takes about a minute per million tasks on 2 busy cores.
        return [*extra, "--probes", str(args.w4_probes)], 300 + queued / 2000
    if workload.contract == "pgbench":
        extra = ["--seconds", f"{args.pgbench_seconds:g}", "--clients", str(args.pgbench_clients)]
        return extra, 2 * args.pgbench_seconds + 180
    return ["--seconds", f"{args.w3_seconds:g}"], args.w3_seconds + 180


def w2_rate(workload: Workload) -> float:
    """The target enqueue rate of a W2 row ("w2-1000": 1,000 a second)."""
    return float(workload.key.split("-")[1])


def last_json_line(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.strip():
            value = json.loads(line)
            if not isinstance(value, dict):
                raise TypeError("the last stdout line is not a JSON object")
            return value
    raise ValueError("no output")


def error_summary(stderr: str, returncode: int | None) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    tail = lines[-1] if lines else "no output on stderr"
    return f"exit {returncode}: {tail}" if returncode is not None else tail


def run_system(
    system: str, workload: Workload, pg_url: str, redis_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Run one system's script once; its JSON, or {"error": ...}."""
    script = script_for(system)
    if not script.exists():
        return {"error": f"{script.relative_to(REPO)} not found"}
    extra, timeout = contract_args(workload, args)
    if system in PSEUDO_SYSTEMS:
        argv = [sys.executable, str(script), "--pg-url", pg_url, *extra]
    else:
        argv = [sys.executable, str(script), "--workload", workload.contract]
        argv += ["--pg-url", pg_url, "--redis-url", redis_url, *extra]
        argv += ["--timeout", f"{max(timeout - ADAPTER_TIMEOUT_MARGIN, timeout / 2):g}"]
    if system == "conveyor":
        argv += args.conveyor_args
    # Its own session, so a run that overstays is stopped with every process it started.
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the adapter then stops the workers it started in their own sessions.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=TERMINATE_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        return {"error": f"timed out after {timeout:.0f}s", "stderr_tail": stderr[-2000:]}
    if process.returncode != 0:
        return {
            "error": error_summary(stderr, process.returncode),
            "stderr_tail": stderr[-2000:],
        }
    try:
        return last_json_line(stdout)
    except (ValueError, TypeError) as exc:
        return {"error": f"bad output: {exc}", "stdout_tail": stdout[-500:]}


def run_once(
    system: str,
    workload: Workload,
    repeat: int,
    *,
    base_url: str,
    redis: Redis | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    name = f"bench_{system}_{workload.key.replace('-', '_')}_{repeat}"
    asyncio.run(admin(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    asyncio.run(admin(base_url, f'CREATE DATABASE "{name}"'))
    # Write out the previous run's dirty pages and the new database's now, or the checkpoint
    # they bring on lands in this run's measurement.
    asyncio.run(admin(base_url, "CHECKPOINT"))
    if redis is not None:
        redis.command("FLUSHALL")
    redis_url = redis.url if redis is not None else "redis://127.0.0.1:1/0"
    started = time.monotonic()
    try:
        result = run_system(system, workload, database_url(base_url, name), redis_url, args)
    finally:
        asyncio.run(admin(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    if result.get("lost") and "error" not in result:
        # Its percentiles cover only the tasks that ran, and would read as a complete run's.
        result["error"] = (
            f"lost {result['lost']:,} of {result['lost'] + result.get('tasks', 0):,} tasks "
            "(not run within the wait after the last send)"
        )
    return result


# --- Summaries and the report --------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


def spread_tree(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread of every number in the runs' results, nested keys kept."""
    first = runs[0]
    tree: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, dict):
            tree[key] = spread_tree([r[key] for r in runs if isinstance(r.get(key), dict)])
        elif isinstance(value, (int, float)):
            values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
            tree[key] = spread(values)
    return tree


def summarize(workload: Workload, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread over the successful runs; the error when none succeeded."""
    good = [r for r in runs if "error" not in r and "unsupported" not in r]
    if not good:
        for key in ("unsupported", "error"):
            found = next((r[key] for r in runs if key in r), None)
            if found is not None:
                return {key: found}
        return {"error": "no runs"}
    summary: dict[str, Any] = {"failed_runs": len(runs) - len(good)}
    duplicates = sum(r.get("duplicates", 0) for r in good)
    if duplicates:
        summary["duplicates"] = duplicates
    if workload.kind in ("scale", "limit"):
        summary.update(spread_tree(good))
        return summary
    if workload.kind == "throughput":
        summary["tasks_per_second"] = spread([r["tasks_per_second"] for r in good])
    else:
        for key in ("start_ms", "finish_ms"):
            summary[key] = {p: spread([r[key][p] for r in good]) for p in LATENCY_PERCENTILES}
        summary["good_runs"] = len(good)
        rates = [r["achieved_rate"] for r in good if r.get("achieved_rate") is not None]
        if rates:
            summary["achieved_rate"] = spread(rates)
    return summary


def headline(workload: Workload, summary: dict[str, Any]) -> list[float] | None:
    """The numbers the ratio is computed on: tasks/s, or start p50 and p99 (ms)."""
    if "error" in summary or "unsupported" in summary:
        return None
    if workload.kind == "throughput":
        return [summary["tasks_per_second"]["median"]]
    return [summary["start_ms"]["p50"]["median"], summary["start_ms"]["p99"]["median"]]


def advantage(workload: Workload, conveyor: float, other: float) -> float | None:
    """How many times better Conveyor is (> 1: Conveyor leads)."""
    if conveyor <= 0 or other <= 0:
        return None
    return conveyor / other if workload.kind == "throughput" else other / conveyor


def fmt_ratio(ratio: float | None, suffix: str = "") -> str:
    return "-" if ratio is None else f"{ratio:.3g}x{suffix}"


def fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def fmt_spread(stats: dict[str, float]) -> str:
    if stats["n"] == 1:
        return fmt(stats["median"])
    return f"{fmt(stats['median'])} [dim]({fmt(stats['min'])}-{fmt(stats['max'])})[/]"


def ratio_cells(workload: Workload, system: str, summaries: dict[str, dict[str, Any]]) -> list[str]:
    own = headline(workload, summaries.get("conveyor", {"error": "not run"}))
    mine = headline(workload, summaries[system])
    width = 1 if workload.kind == "throughput" else 2
    if own is None or mine is None:
        return ["-"] * width
    if system != "conveyor":
        ratios = [advantage(workload, c, o) for c, o in zip(own, mine, strict=True)]
        return [fmt_ratio(r) for r in ratios]
    peers = [headline(workload, s) for name, s in summaries.items() if name != "conveyor"]
    cells = []
    for index in range(width):
        values = [p[index] for p in peers if p is not None]
        if not values:
            cells.append("no peer")
            continue
        best = max(values) if workload.kind == "throughput" else min(values)
        ratio = advantage(workload, own[index], best)
        cells.append(fmt_ratio(ratio, " vs best"))
    return cells


def table_for(
    workload: Workload, summaries: dict[str, dict[str, Any]], args: argparse.Namespace
) -> Table:
    table = Table(title=workload.title.format(**vars(args)), title_justify="left", min_width=100)
    table.add_column("system")
    if workload.kind == "throughput":
        table.add_column("tasks/s", justify="right")
        table.add_column("Conveyor ratio", justify="right")
    else:
        for key in ("start", "finish"):
            for p in LATENCY_PERCENTILES:
                table.add_column(f"{key} {p}", justify="right")
        table.add_column("sent/s", justify="right")
        table.add_column("ratio p50", justify="right")
        table.add_column("ratio p99", justify="right")
    width = 2 if workload.kind == "throughput" else 9
    for system, summary in summaries.items():
        problem = summary.get("unsupported") or summary.get("error")
        if problem is not None:
            label = "unsupported" if "unsupported" in summary else "n/a"
            table.add_row(system, f"{label}: {str(problem)[:90]}", *[""] * (width - 1))
            continue
        if workload.kind == "throughput":
            values = [fmt_spread(summary["tasks_per_second"])]
        else:
            values = [
                fmt_spread(summary[key][p])
                for key in ("start_ms", "finish_ms")
                for p in LATENCY_PERCENTILES
            ]
            sent = summary.get("achieved_rate")
            values.append(fmt(sent["median"]) if sent else "-")
        failed = summary["failed_runs"]
        label = system + (f" [red]({failed} failed)[/]" if failed else "")
        if workload.kind == "latency" and sent_short(workload, summary):
            label += " [yellow]*[/]"
        if summary.get("duplicates"):
            label += " [yellow]†[/]"
        table.add_row(label, *values, *ratio_cells(workload, system, summaries))
    return table


def sent_short(workload: Workload, summary: dict[str, Any]) -> bool:
    """Whether any run of a W2 cell sent below the tolerance, or did not say what it sent."""
    sent = summary.get("achieved_rate")
    if sent is None or sent["n"] < summary.get("good_runs", sent["n"]):
        return True
    return bool(sent["min"] < W2_RATE_TOLERANCE * w2_rate(workload))


def row_notes(workload: Workload, summaries: dict[str, dict[str, Any]]) -> list[str]:
    """The footnotes of the rows marked in :func:`table_for`."""
    notes = []
    short = shortfall_note(workload, summaries)
    if short is not None:
        notes.append(short)
    repeated = [
        f"{system} ({summary['duplicates']:,} over the runs)"
        for system, summary in summaries.items()
        if summary.get("duplicates")
    ]
    if repeated:
        notes.append(
            f"[yellow]† ran some tasks more than once: {', '.join(repeated)}; each task's "
            "first run is the one timed[/]"
        )
    return notes


def shortfall_note(workload: Workload, summaries: dict[str, dict[str, Any]]) -> str | None:
    """The footnote for the W2 rows marked by :func:`sent_short`."""
    if workload.kind != "latency":
        return None
    short = []
    for system, summary in summaries.items():
        if "error" in summary or "unsupported" in summary:
            continue
        if sent_short(workload, summary):
            sent = summary.get("achieved_rate")
            low = f"{fmt(sent['min'])}/s at the lowest" if sent else "rate not reported"
            short.append(f"{system} ({low})")
    if not short:
        return None
    return (
        f"[yellow]* sent below {W2_RATE_TOLERANCE:.0%} of the target rate "
        f"({fmt(w2_rate(workload))}/s): {', '.join(short)}; its latencies are of a lighter "
        "load[/]"
    )


def caption(workload: Workload) -> str:
    text = "median (min-max) over the repeats; ratio: how many times better Conveyor is"
    if workload.kind == "latency":
        text += (
            " (on start p50, p99); sent/s: the enqueue rate achieved, first send to last"
            f" (every producer is open loop: each call at its time, up to {W2_IN_FLIGHT} at once)"
        )
    return f"[dim]{text}[/]" + (f"\n[dim]{workload.target}[/]" if workload.target else "")


def systems_for(workload: Workload, args: argparse.Namespace) -> list[str]:
    if workload.only is None:
        return list(args.systems)
    return [s for s in workload.only if s in PSEUDO_SYSTEMS or s in args.systems]


def first_good(results: dict[str, dict[str, Any]], key: str, system: str) -> dict[str, Any]:
    """The summary of one cell, and its first successful run (for the non-numeric parts)."""
    entry = results.get(key, {}).get(system)
    if entry is None:
        return {}
    good = [r for r in entry["runs"] if "error" not in r and "unsupported" not in r]
    return {"summary": entry["summary"], "run": good[0] if good else None}


def med(stats: dict[str, Any], *path: str) -> float | None:
    """The median at `path` in a spread_tree summary (None if missing)."""
    node: Any = stats
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node.get("median") if isinstance(node, dict) else None


def cell(value: float | None) -> str:
    return "-" if value is None else fmt(value)


def scale_report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[Any]:
    """W4: one row per backlog depth, then the 1M / 10k ratios and the claim's plan."""
    keys = [k for k in ("w4-10k", "w4-1m") if k in results]
    if not keys:
        return []
    table = Table(
        title=f"W4 scale: LeaseTasks of 1 task with wait 0 (ms), idle and while the workers "
        f"drain {args.w4_drain:,} tasks; drain tasks/s; RSS MiB (idle / load)",
        title_justify="left",
        min_width=100,
    )
    for name in ("queued", "lease p50", "p95", "p99", "load p50", "load p99", "drain /s"):
        table.add_column(name, justify="right")
    for name in ("server RSS", "worker RSS", "backlog built"):
        table.add_column(name, justify="right")
    summaries: dict[str, dict[str, Any]] = {}
    for key in keys:
        found = first_good(results, key, "conveyor")
        summary = found.get("summary", {"error": "not run"})
        queued = W4_SMALL if key == "w4-10k" else args.w4_queued
        problem = summary.get("error") or summary.get("unsupported")
        if problem is not None:
            table.add_row(f"{queued:,}", f"n/a: {str(problem)[:90]}", *[""] * 8)
            continue
        summaries[key] = summary
        table.add_row(
            f"{queued:,}",
            *(cell(med(summary, "lease_ms", "idle", q)) for q in LATENCY_PERCENTILES),
            cell(med(summary, "lease_ms", "load", "p50")),
            cell(med(summary, "lease_ms", "load", "p99")),
            fmt_spread(summary["tasks_per_second"]),
            f"{cell(med(summary, 'idle_workers_server_rss_mib'))} / "
            f"{cell(med(summary, 'load_server_rss_mib'))}",
            f"{cell(med(summary, 'idle_worker_rss_mib'))} / "
            f"{cell(med(summary, 'load_worker_rss_mib'))}",
            f"{cell(med(summary, 'backlog_build_seconds'))} s",
        )
    notes = [
        (
            "median over the repeats; lease: the probe's LeaseTasks call alone, client clock; "
            "drain: the same number of tasks at both depths, database timestamps"
        ),
        *scale_notes(results, summaries, args),
    ]
    return [table, *(f"[dim]{note}[/]" for note in notes)]


def scale_notes(
    results: dict[str, dict[str, Any]],
    summaries: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> list[str]:
    """The 1M / 10k ratios, and the claim's plan before and after each drain."""
    notes = []
    small, large = summaries.get("w4-10k"), summaries.get("w4-1m")
    if small and large:
        parts = []
        for label, path in (
            ("lease p50 idle", ("lease_ms", "idle", "p50")),
            ("lease p50 under load", ("lease_ms", "load", "p50")),
            ("lease p99 idle", ("lease_ms", "idle", "p99")),
            ("drain tasks/s", ("tasks_per_second",)),
        ):
            low, high = med(small, *path), med(large, *path)
            if low and high:
                parts.append(f"{label} {high / low:.2f}x")
        low, high = med(small, "lease_ms", "idle", "p50"), med(large, "lease_ms", "idle", "p50")
        verdict = "met" if low and high and high / low <= W4_TARGET else "not met"
        notes.append(
            f"{args.w4_queued:,} queued / {W4_SMALL:,} queued: "
            + ", ".join(parts)
            + f" (target: lease p50 idle <= {W4_TARGET:g}x: {verdict})"
        )
    for key in summaries:
        run = first_good(results, key, "conveyor").get("run")
        plans = (run or {}).get("claim_plan", {})
        for moment in ("before_drain", "after_drain"):
            plan = plans.get(moment, {}).get("generic")
            if plan:
                notes.append(
                    f"{key} task_claim of {plans[moment]['limit']} (generic plan) "
                    f"{moment.replace('_', ' ')}: {plan['scan']}, {plan['scan_buffers']} "
                    f"buffers in the scan, {plan['buffers']} in all, {plan['execution_ms']} ms"
                )
    return notes


def limit_report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[Any]:
    """pgbench with Conveyor's statements, and Conveyor's W1 as a fraction of the batch."""
    found = first_good(results, "pgbench", POSTGRESQL)
    if not found:
        return []
    summary = found["summary"]
    table = Table(
        title=f"PostgreSQL limit (pgbench, Conveyor's statements): -c {args.pgbench_clients} "
        f"-j {int(med(summary, 'jobs') or 0)} -T {args.pgbench_seconds:g} -M prepared, durable",
        title_justify="left",
        min_width=100,
    )
    table.add_column("mode")
    table.add_column("tasks/s", justify="right")
    table.add_column("pgbench tps", justify="right")
    table.add_column("ms per statement: enqueue / claim / complete", justify="right")
    table.add_column("Conveyor W1 as a fraction", justify="right")
    problem = summary.get("error") or summary.get("unsupported")
    if problem is not None:
        table.add_row("pgbench", f"n/a: {str(problem)[:90]}", "", "", "")
        return [table]
    w1_summary = results.get("w1", {}).get("conveyor", {}).get("summary", {})
    # Without a W1 run in this invocation (--workloads pgbench), there is nothing to compare.
    w1 = headline(WORKLOADS["w1"], w1_summary) if w1_summary else None
    good = [r for r in results["pgbench"][POSTGRESQL]["runs"] if "error" not in r]
    for key, label in (
        ("single_row", "single-row (3 transactions per task)"),
        ("batched", f"batched ({int(med(summary, 'batch') or 0)} per statement)"),
    ):
        if key not in summary:
            continue
        latencies = [r[key]["statement_latency_ms"] for r in good if key in r]
        per_statement = (
            " / ".join(fmt(statistics.median(column)) for column in zip(*latencies, strict=True))
            if latencies
            else "-"
        )
        limit = med(summary, key, "tasks_per_second")
        fraction = f"{w1[0] / limit:.0%}" if w1 and limit else "-"
        table.add_row(
            label,
            fmt_spread(summary[key]["tasks_per_second"]),
            cell(med(summary, key, "tps")),
            per_statement,
            fraction,
        )
    notes = [
        (
            "tasks/s: tasks recorded as succeeded / pgbench's measured time; each statement is "
            "Conveyor's own (queries.sql), its $N parameters rewritten into SQL expressions"
        )
    ]
    if w1 is None:
        notes.append("Conveyor's W1 did not run in this invocation: add w1 for the fraction")
    else:
        notes.append(f"Conveyor W1: {fmt(w1[0])} tasks/s; {WORKLOADS['pgbench'].target}")
    return [table, *(f"[dim]{note}[/]" for note in notes)]


def floor_report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[Any]:
    """The floor under W3 single, and Conveyor's W3 single and the target against it."""
    found = first_good(results, "w3-floor", FLOOR)
    if not found:
        return []
    summary = found["summary"]
    table = Table(
        title=f"{WORKLOADS['w3-floor'].title}, {args.w3_seconds:g} s (enqueues/s)",
        title_justify="left",
        min_width=100,
    )
    for name in ("", "enqueues/s", "client CPU µs each", "server CPU µs each", "of the floor"):
        table.add_column(name, justify="right" if name else "left")
    problem = summary.get("error") or summary.get("unsupported")
    if problem is not None:
        table.add_row("floor", f"n/a: {str(problem)[:90]}", "", "", "")
        return [table]
    floor = med(summary, "tasks_per_second")
    table.add_row(
        "floor (gRPC stream + one INSERT)",
        fmt_spread(summary["tasks_per_second"]),
        cell(med(summary, "client_cpu_us_per_task")),
        cell(med(summary, "server_cpu_us_per_task")),
        "100%",
    )
    conveyor = results.get("w3-single", {}).get("conveyor", {}).get("summary", {})
    single = headline(WORKLOADS["w3-single"], conveyor) if conveyor else None
    if single is not None:
        fraction = f"{single[0] / floor:.0%}" if floor else "-"
        table.add_row(
            "Conveyor W3 single", fmt_spread(conveyor["tasks_per_second"]), "", "", fraction
        )
    # The floor's parts alone (older result files lack them): their sum is the bound.
    transport, insert = med(summary, "transport_alone_us"), med(summary, "insert_alone_us")
    bound = med(summary, "bound_per_second")
    if transport and insert and bound:
        table.add_row(
            "  the transport alone (a message each way)",
            fmt(1e6 / transport),
            cell(med(summary, "transport_client_cpu_us")),
            cell(med(summary, "transport_server_cpu_us")),
            "",
        )
        table.add_row("  the insert and its commit alone", fmt(1e6 / insert), "", "", "")
        table.add_row(
            "  both, one after the other: the bound",
            fmt_spread(summary["bound_per_second"]),
            "",
            "",
            f"{bound / floor:.0%}" if floor else "-",
        )
    versus = [f"{W3_SINGLE_TARGET / floor:.2g}x the floor"] if floor else []
    if bound:
        versus.append(f"{W3_SINGLE_TARGET / bound:.2g}x the bound")
    table.add_row("the target", fmt(W3_SINGLE_TARGET), "", "", ", ".join(versus) or "-")
    return [table, f"[dim]{WORKLOADS['w3-floor'].target}[/]"]


def memory_table(results: dict[str, dict[str, Any]]) -> Table | None:
    """Conveyor's process RSS: idle (before W2's load), under W1's load and the burst's."""
    rows = []
    for key, label, workloads in (
        ("idle_worker_rss_mib", "worker, idle (W2 before the load)", ("w2-200", "w2-1000")),
        ("idle_server_rss_mib", "server, idle (W2 before the load)", ("w2-200", "w2-1000")),
        ("load_worker_rss_mib", "worker, peak during W1", ("w1",)),
        ("load_server_rss_mib", "server, peak during W1", ("w1",)),
        ("load_worker_rss_mib", "worker, peak during the burst", ("burst",)),
        ("load_server_rss_mib", "server, peak during the burst", ("burst",)),
    ):
        # Each row from its own workload: the burst's 150,000 tasks are not W1's 20,000,
        # and W4 has its own table.
        values = [
            run[key]
            for name in workloads
            for run in results.get(name, {}).get("conveyor", {}).get("runs", [])
            if run.get(key) is not None
        ]
        if values:
            rows.append((label, fmt(statistics.median(values))))
    if not rows:
        return None
    table = Table(
        title="Conveyor memory (RSS, MiB, median); target: idle worker <= 60 MiB",
        title_justify="left",
        min_width=100,
    )
    table.add_column("process")
    table.add_column("MiB", justify="right")
    for row in rows:
        table.add_row(*row)
    return table


# The settings that make a commit durable: every system is measured with them on.
DURABLE_SETTINGS = ("fsync", "synchronous_commit")


def check_durable(base_url: str) -> None:
    """Exit with an error unless the database commits durably (a --pg-url may not)."""
    off = [
        f"{name}={value}"
        for name in DURABLE_SETTINGS
        if (value := asyncio.run(admin(base_url, f"SHOW {name}"))) != "on"
    ]
    if off:
        sys.exit(
            f"refusing to run: the benchmark needs durable commits, but this PostgreSQL has "
            f"{', '.join(off)} (set {' and '.join(DURABLE_SETTINGS)} to on)"
        )


def machine_info(base_url: str, redis: Redis | None) -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    settings = asyncio.run(
        admin(
            base_url,
            "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings"
            " WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes',"
            " 'shared_buffers', 'max_connections')",
        )
    )
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": asyncio.run(admin(base_url, "SHOW server_version")),
        "postgresql_settings": settings,
        "redis": redis.version() if redis is not None else None,
        "conveyor_commit": commit,
    }


# --- Main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat, short loads (smoke).")
    parser.add_argument("--repeat", type=int, default=None, help="Runs per cell (default 3).")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="Comma separated.")
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"Comma separated, of {', '.join(WORKLOADS)}; w2, w3 or w4 selects its rows.",
    )
    parser.add_argument("--tasks", type=int, default=None, help="W1 tasks (default 20,000).")
    parser.add_argument(
        "--burst-tasks", type=int, default=None, help="The burst row's tasks (default 150,000)."
    )
    parser.add_argument("--w2-seconds", type=float, default=None, help="Default 30 (quick 10).")
    parser.add_argument("--w3-seconds", type=float, default=None, help="Default 10 (quick 3).")
    parser.add_argument("--w1-timeout", type=float, default=900.0)
    parser.add_argument(
        "--w4-queued", type=int, default=1_000_000, help="W4's large backlog (default 1M)."
    )
    parser.add_argument(
        "--w4-drain",
        type=int,
        default=W4_SMALL // 2,
        help="W4 tasks drained at each depth (default 5,000: half the small backlog).",
    )
    parser.add_argument(
        "--w4-probes", type=int, default=None, help="W4 idle lease probes (300, quick 100)."
    )
    parser.add_argument(
        "--pgbench-seconds", type=float, default=None, help="pgbench -T per mode (10, quick 5)."
    )
    parser.add_argument("--pgbench-clients", type=int, default=8, help="pgbench -c.")
    parser.add_argument(
        "--conveyor-arg",
        dest="conveyor_args",
        action="append",
        default=[],
        help="Passed on to conveyor_workloads.py, e.g. --conveyor-arg=--concurrency=32.",
    )
    parser.add_argument(
        "--pg-url",
        default=None,
        help="Use this PostgreSQL (a superuser URL) instead of starting a throwaway cluster.",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.tasks = args.tasks or 20_000
    args.burst_tasks = args.burst_tasks or 150_000
    args.w2_seconds = args.w2_seconds or (10.0 if args.quick else 30.0)
    args.w3_seconds = args.w3_seconds or (3.0 if args.quick else 10.0)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.w4_probes = args.w4_probes or (100 if args.quick else 300)
    args.pgbench_seconds = args.pgbench_seconds or (5.0 if args.quick else 10.0)
    chosen: list[str] = []
    for name in (w.strip() for w in args.workloads.split(",") if w.strip()):
        # A family name (w2, w3, w4) selects each of its rows.
        family = [k for k in WORKLOADS if k == name or k.startswith(f"{name}-")]
        if not family:
            parser.error(f"unknown workload {name!r}; choose from {list(WORKLOADS)} or w2, w3, w4")
        chosen += [k for k in family if k not in chosen]
    args.workloads = chosen
    return args


def run_workloads(
    args: argparse.Namespace, base_url: str, redis: Redis | None
) -> dict[str, dict[str, Any]]:
    """Every selected workload on every system it applies to; prints the peer tables."""
    results: dict[str, dict[str, Any]] = {}
    for key in args.workloads:
        workload = WORKLOADS[key]
        systems = systems_for(workload, args)
        if not systems:
            console.print(f"[yellow]{key}: skipped, only {', '.join(workload.only or [])}[/]")
            continue
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
        # Repeats interleave the systems, so a slow drift hits them all alike.
        for repeat in range(args.repeat):
            for system in systems:
                result = run_once(
                    system, workload, repeat, base_url=base_url, redis=redis, args=args
                )
                runs[system].append(result)
                console.log(f"{key} {system} #{repeat + 1}: {brief(result)}")
        summaries = {s: summarize(workload, r) for s, r in runs.items()}
        results[key] = {s: {"summary": summaries[s], "runs": runs[s]} for s in systems}
        if workload.kind in ("throughput", "latency"):
            console.print(table_for(workload, summaries, args))
            console.print(caption(workload))
            for note in row_notes(workload, summaries):
                console.print(note)
            console.print()
    return results


def main() -> None:
    args = parse_args()
    base_url = args.pg_url or os.environ.get("CONVEYOR_TEST_DATABASE_URL")
    if args.pg_url is None and os.environ.get(INSIDE_ENV) != "1":
        reexec_under_postgres()
    if not base_url:
        sys.exit("no PostgreSQL: CONVEYOR_TEST_DATABASE_URL is not set")
    check_durable(base_url)

    redis: Redis | None = None
    if any(s in REDIS_SYSTEMS for s in args.systems):
        binary = ensure_redis_server()
        if binary is None:
            console.print("[red]redis-server unavailable: Redis peers will fail[/]")
        else:
            redis = Redis(binary)
            redis.start()
    try:
        machine = machine_info(base_url, redis)
        console.print(
            f"[bold]Machine[/]: {machine['cores']} cores ({machine['cpu']}), {machine['memory']}, "
            f"PostgreSQL {machine['postgresql']} ({machine['postgresql_settings']}), "
            f"Redis {machine['redis'] or '-'}, Python {machine['python']}, "
            f"Conveyor {machine['conveyor_commit']}"
        )
        console.print(
            f"repeats: {args.repeat}, W1 tasks: {args.tasks:,} (burst {args.burst_tasks:,}), "
            f"W2: {args.w2_seconds:g} s, "
            f"W3: {args.w3_seconds:g} s, W4: {W4_SMALL:,} and {args.w4_queued:,} queued, "
            f"{args.w4_probes} probes, {args.w4_drain:,} drained, pgbench: "
            f"{args.pgbench_seconds:g} s per mode; systems: {', '.join(args.systems)}; "
            f"worker processes: {WORKER_PROCESSES} for every system\n"
        )
        results = run_workloads(args, base_url, redis)
        # The floor, W4 and the pgbench limit compare across workloads: printed once all
        # have run.
        for part in (
            *floor_report(results, args),
            *scale_report(results, args),
            *limit_report(results, args),
        ):
            console.print(part)
        console.print()
        memory = memory_table(results)
        if memory is not None:
            console.print(memory)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine,
            "settings": {
                "repeat": args.repeat,
                "quick": args.quick,
                "tasks": args.tasks,
                "burst_tasks": args.burst_tasks,
                "w2_seconds": args.w2_seconds,
                "w3_seconds": args.w3_seconds,
                "w4_queued": args.w4_queued,
                "w4_drain": args.w4_drain,
                "w4_probes": args.w4_probes,
                "pgbench_seconds": args.pgbench_seconds,
                "pgbench_clients": args.pgbench_clients,
                "systems": args.systems,
                "conveyor_args": args.conveyor_args,
                "worker_processes": WORKER_PROCESSES,
            },
            "results": results,
        }
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        console.print(f"\nwrote {args.out}")
    finally:
        if redis is not None:
            redis.stop()


def brief(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"[red]error[/] {result['error'][:120]}"
    if "unsupported" in result:
        return f"unsupported: {result['unsupported']}"
    if "lease_ms" in result:
        idle, load = result["lease_ms"]["idle"], result["lease_ms"]["load"]
        return (
            f"{result['queued']:,} queued: lease p50 {idle['p50']} p99 {idle['p99']} ms idle, "
            f"p50 {load['p50']} p99 {load['p99']} ms under load; drain "
            f"{result['tasks_per_second']:,.0f} tasks/s ({result['wall_seconds']} s)"
        )
    if "batched" in result or "single_row" in result:
        modes = [
            f"{label} {result[key]['tasks_per_second']:,.0f} tasks/s"
            for key, label in (("single_row", "single-row"), ("batched", "batched"))
            if key in result
        ]
        return f"pgbench {', '.join(modes)} ({result['wall_seconds']} s)"
    if "tasks_per_second" in result:
        return f"{result['tasks_per_second']:,.0f} tasks/s ({result['wall_seconds']} s)"
    start, finish = result["start_ms"], result["finish_ms"]
    return (
        f"start p50 {start['p50']} p99 {start['p99']} ms, finish p50 {finish['p50']} "
        f"p99 {finish['p99']} ms, sent {result.get('achieved_rate')}/s "
        f"({result['wall_seconds']} s)"
    )


if __name__ == "__main__":
    main()
