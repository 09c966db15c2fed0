"""PostgreSQL's own limit for Conveyor's work: pgbench running Conveyor's statements.

    .venv/bin/python benchmarks/pgbench_limit.py --pg-url URL [--seconds 10] [--clients 8]
        [--jobs 2] [--batch 100] [--modes single,batched]

A task's life in the database is three statements, taken at run time from
src/conveyor/storage/queries.sql: enqueue (`task_insert_many`), claim (`task_claim`) and
complete (`task_succeed_many`), with their history rows (the enqueue writes none: its
`enqueued` event is the task row) and the enqueue's NOTIFY. This
script runs them with PostgreSQL's pgbench, with no Python, no gRPC and no server in the
way, on the benchmark's durable PostgreSQL (fsync and synchronous_commit on), in two modes:

- single: one task at a time, as three single-row transactions per task. The claim's row
  comes back through pgbench's `\\aset` into variables, and the completion names that
  task and lease. A claim can find nothing (the other clients took every task this one's
  snapshot sees): `\\aset` then keeps the previous values (the first time, `-D` zero
  ids), so the completion names a finished task and the fencing refuses it, a no-op.
- batched: `--batch` tasks (100) per statement, three transactions per batch. pgbench cannot
  carry a 100-row result into the next statement, so the claim's final projection (not its
  work) is rewritten to return the claimed ids and lease ids as two arrays in one row,
  which `\\gset` carries into the completion, as the server carries the rows it claimed.
  (Until migration 0012 the completion read them back by the claiming worker through an
  index of running tasks by worker, which Conveyor no longer has.)

How the statements become pgbench scripts (benchmarks/conveyor_sql.py): each `$N` bind
parameter is replaced mechanically by a SQL expression in parentheses: the ids by
UUIDv7s the database makes (time-ordered, like the client's), the other arrays by
`array_fill` of what a bare `Task(type="bench.noop")` sends (empty payload, the default
timeout and retries, no trace context), the lease and grace by the server's defaults, and
the worker id by `'pgbench-' || :client_id` (pgbench's client number: each client is its
own worker). Comments are dropped first. The rewrite refuses a statement whose parameters
changed. pgbench runs with `-M prepared`, as asyncpg prepares Conveyor's statements.

`--modes single-no-notify,batched-no-notify` are diagnostics, never run by default and not
Conveyor's statements: the same scripts with the enqueue's `pg_notify(...)` replaced by
NULL. A transaction that NOTIFYs takes a database-wide lock just before it commits and
holds it until after its commit record is flushed, so concurrent enqueues cannot share a
WAL flush; comparing the modes shows what that costs.

Before each mode the tables are emptied (TRUNCATE), analysed and checkpointed, so both
start alike. `tasks_per_second` = tasks the database records as succeeded during the run /
pgbench's measured duration (transactions / tps); it equals pgbench's tps x tasks per
script when every claim found its tasks, and `short_claims` says by how many it fell short.
Prints one JSON object on its last stdout line, as the workload scripts do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

import asyncpg

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import conveyor_sql  # noqa: E402 - benchmarks/ is not a package
from apps import NOOP_TYPE  # noqa: E402

CONVEYOR = Path(sys.executable).parent / "conveyor"
PG_BINDIR = Path(os.environ.get("PG15_BINDIR", "/usr/lib/postgresql/15/bin"))
MODES: Final = ("single", "batched")
# Diagnostics, never run by default: the same scripts with the enqueue's NOTIFY taken out.
# A transaction that NOTIFYs holds a database-wide lock from just before its commit until
# after it, so such commits cannot share a WAL flush; these modes show what that costs.
DIAGNOSTIC_MODES: Final = ("single-no-notify", "batched-no-notify")
NOTIFY_CALL: Final = "pg_notify('conveyor_task_ready', '')"
WORKER_ID: Final = "'pgbench-' || :client_id"
ZERO_UUID: Final = "00000000-0000-0000-0000-000000000000"


def single_script() -> str:
    """One task: enqueue, claim (its row saved by \\aset), complete; three transactions."""
    claim = conveyor_sql.claim(NOOP_TYPE, "1", WORKER_ID).rstrip().removesuffix(";")
    complete = conveyor_sql.succeed_many(
        "ARRAY[:claimed_id::uuid]", "ARRAY[:claimed_lease_id::uuid]", "1", WORKER_ID
    )
    return "\n".join(
        [
            conveyor_sql.insert_many(NOOP_TYPE, "1"),
            claim,
            # Not \\gset, which aborts the client when a claim finds nothing.
            "\\aset claimed_",
            complete,
            "",
        ]
    )


def batched_script(batch: int) -> str:
    """`batch` tasks: enqueue, claim (its rows saved as two arrays by \\gset), complete; one
    statement and transaction each."""
    claim = conveyor_sql.claim_as_arrays(NOOP_TYPE, str(batch), WORKER_ID)
    return "\n".join(
        [
            conveyor_sql.insert_many(NOOP_TYPE, str(batch)),
            claim.rstrip().removesuffix(";"),
            # Always one row (empty arrays when the claim found nothing), so \\gset never
            # aborts the client.
            "\\gset claimed_",
            conveyor_sql.succeed_many(
                "(:claimed_ids)::uuid[]",
                "(:claimed_lease_ids)::uuid[]",
                "cardinality((:claimed_ids)::uuid[])",
                WORKER_ID,
            ),
            "",
        ]
    )


def script_for(mode: str, batch: int) -> str:
    script = single_script() if mode.startswith("single") else batched_script(batch)
    if mode.endswith("-no-notify"):
        if NOTIFY_CALL not in script:
            raise RuntimeError(f"the enqueue statement no longer calls {NOTIFY_CALL}")
        script = script.replace(NOTIFY_CALL, "NULL")
    return script


def result_key(mode: str) -> str:
    """single -> single_row, batched-no-notify -> batched_no_notify."""
    return mode.replace("single", "single_row").replace("-", "_")


def parse_pgbench(output: str) -> dict[str, Any]:
    """Transactions, tps, latency and failures from pgbench's report."""

    def number(pattern: str) -> float | None:
        found = re.search(pattern, output, re.MULTILINE)
        return float(found.group(1)) if found else None

    transactions = number(r"^number of transactions actually processed: (\d+)")
    tps = number(r"^tps = ([\d.]+) \(without initial connection time\)")
    if transactions is None or tps is None:
        raise RuntimeError(f"unexpected pgbench output:\n{output[-2000:]}")
    failed = number(r"^number of failed transactions: (\d+)")
    # -r: one line per statement, "<latency ms> <failures> <first line of the statement>".
    statements = [
        float(line.split()[0])
        for line in output.splitlines()
        if re.match(r"^\s+[\d.]+\s+\d+\s+\S", line)
    ]
    return {
        "transactions": int(transactions),
        "tps": round(tps, 1),
        "latency_ms": number(r"^latency average = ([\d.]+) ms"),
        "failed_transactions": int(failed or 0),
        "statement_latency_ms": statements,
    }


async def reset(url: str) -> int:
    """Empty Conveyor's task tables and start from a checkpoint; returns succeeded (0)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE conveyor_tasks, conveyor_task_events")
        await conn.execute("VACUUM ANALYZE conveyor_tasks")
        await conn.execute("VACUUM ANALYZE conveyor_task_events")
        await conn.execute("CHECKPOINT")
        return int(
            await conn.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'succeeded'")
        )
    finally:
        await conn.close()


async def succeeded(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM conveyor_tasks WHERE state = 'succeeded'")
        )
    finally:
        await conn.close()


def run_mode(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    tasks_per_script = 1 if mode.startswith("single") else args.batch
    path = workdir / f"{mode}.sql"
    path.write_text(script_for(mode, args.batch))
    before = asyncio.run(reset(args.pg_url))
    argv = [
        args.pgbench,
        "--no-vacuum",  # pgbench's own tables do not exist; Conveyor's were just vacuumed
        "-M",
        "prepared",
        "-r",
        "-c",
        str(args.clients),
        "-j",
        str(args.jobs),
        "-T",
        f"{args.seconds:g}",
        "-f",
        str(path),
        # What a claim that found nothing leaves for the completion: a lease of no task.
        "-D",
        f"claimed_id={ZERO_UUID}",
        "-D",
        f"claimed_lease_id={ZERO_UUID}",
        args.pg_url,
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=args.seconds * 3 + 60
    )
    if done.returncode != 0:
        raise RuntimeError(f"pgbench {mode} exited {done.returncode}:\n{done.stderr[-2000:]}")
    report = parse_pgbench(done.stdout)
    tasks = asyncio.run(succeeded(args.pg_url)) - before
    seconds = report["transactions"] / report["tps"]
    return {
        "tasks_per_second": round(tasks / seconds, 1),
        "tasks": tasks,
        "tasks_per_script": tasks_per_script,
        "transactions_per_task": round(3 / tasks_per_script, 3),
        "short_claims": report["transactions"] * tasks_per_script - tasks,
        **report,
    }


def migrate(url: str) -> None:
    done = subprocess.run(
        [str(CONVEYOR), "migrate", "--database-url", url],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"conveyor migrate failed:\n{done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-url", required=True)
    parser.add_argument("--seconds", type=float, default=10.0, help="pgbench -T per mode.")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c.")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j (threads).")
    parser.add_argument("--batch", type=int, default=100, help="Tasks per statement, batched.")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"Comma separated, of {', '.join(MODES + DIAGNOSTIC_MODES)}.",
    )
    parser.add_argument(
        "--pgbench",
        default=shutil.which("pgbench", path=str(PG_BINDIR)) or shutil.which("pgbench"),
        help="The pgbench binary (default: PostgreSQL 15's).",
    )
    parser.add_argument(
        "--print-scripts", action="store_true", help="Print the pgbench scripts and exit."
    )
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in MODES + DIAGNOSTIC_MODES]:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES + DIAGNOSTIC_MODES)}")
    if args.print_scripts:
        for mode in modes:
            print(f"-- {mode}\n{script_for(mode, args.batch)}")
        return
    if not args.pgbench:
        sys.exit(f"pgbench not found in {PG_BINDIR} or on PATH (apt-get install postgresql-15)")
    migrate(args.pg_url)
    result: dict[str, Any] = {
        "clients": args.clients,
        "jobs": args.jobs,
        "seconds": args.seconds,
        "batch": args.batch,
    }
    with tempfile.TemporaryDirectory(prefix="conveyor-pgbench-") as workdir:
        for mode in modes:
            key = result_key(mode)
            result[key] = run_mode(mode, args, Path(workdir))
            print(f"{mode}: {result[key]['tasks_per_second']:,.0f} tasks/s", file=sys.stderr)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
