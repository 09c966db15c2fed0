"""What security costs: Conveyor plain, with tokens, with tokens and TLS, and with a codec.

Starts an embedded PostgreSQL and, for each set-up in turn (all of them, then again, so
that a slow minute of the disk hits every set-up alike), a fresh database and a real
server in this process. It then measures:

- **sequential**: single enqueues, one after another (one round trip each);
- **concurrent**: 32 producers enqueueing single tasks at once (the client joins them);
- **drain**: one worker (64 slots) running pre-queued no-op tasks (leases, reports,
  heartbeats: the worker's calls).

Prints a table of medians with each set-up's ratio to plain, and writes
benchmarks/results/security_overhead.json.

    .venv/bin/python benchmarks/security_overhead.py [--repeat 2] [--tasks 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import trustme

from conveyor import AesGcmCodec, AsyncClient, Task, TlsConfig, Worker
from conveyor.auth import Role, new_token
from conveyor.server.app import ConveyorServer
from conveyor.server.config import ServerConfig
from conveyor.storage import migrate
from conveyor.storage.embedded import EmbeddedPostgres

SETUPS = ("plain", "tokens", "tokens+tls", "tokens+tls+codec")
PRODUCERS = 32


@dataclass
class Materials:
    """Certificates and tokens shared by every run."""

    directory: Path
    ca: Path = field(init=False)
    cert: Path = field(init=False)
    key: Path = field(init=False)
    tokens: Path = field(init=False)
    producer: str = field(init=False)
    worker: str = field(init=False)

    def __post_init__(self) -> None:
        authority = trustme.CA()
        issued = authority.issue_cert("127.0.0.1", "localhost")
        self.ca, self.cert, self.key = (
            self.directory / "ca.pem",
            self.directory / "cert.pem",
            self.directory / "key.pem",
        )
        authority.cert_pem.write_to_path(str(self.ca))
        self.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(self.key))
        self.producer, producer_entry = new_token("bench-app", Role.PRODUCER)
        self.worker, worker_entry = new_token("bench-workers", Role.WORKER)
        self.tokens = self.directory / "tokens.toml"
        self.tokens.write_text(producer_entry.as_toml() + "\n" + worker_entry.as_toml())


async def fresh_database(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    conn = await asyncpg.connect(url)
    try:
        await migrate.migrate(conn)
    finally:
        await conn.close()
    return url


async def run_setup(setup: str, url: str, materials: Materials, tasks: int) -> dict[str, float]:
    """One set-up's three measurements, in tasks per second."""
    secured = setup != "plain"
    tls = "tls" in setup
    config = ServerConfig(
        database_url=url,
        grpc_listen="127.0.0.1:0",
        http_listen=None,
        tokens_file=materials.tokens if secured else None,
        tls_cert_file=materials.cert if tls else None,
        tls_key_file=materials.key if tls else None,
        rate_limit=None,  # the point is the cost of checking, not of being refused
    )
    server = ConveyorServer(config)
    await server.start()
    address = f"127.0.0.1:{server.grpc_port}"
    credentials: dict[str, Any] = {
        "tls": TlsConfig(ca_file=materials.ca) if tls else False,
        "codec": AesGcmCodec([("k1", b"\x01" * 32)]) if "codec" in setup else None,
    }
    try:
        async with AsyncClient(
            address, token=materials.producer if secured else None, **credentials
        ) as client:
            started = time.perf_counter()
            for _ in range(tasks // 3):
                await client.enqueue_task(Task(type="bench.seq", payload=b"x" * 100))
            sequential = (tasks // 3) / (time.perf_counter() - started)

            async def producer(count: int) -> None:
                for _ in range(count):
                    await client.enqueue_task(Task(type="bench.drain", payload=b"x" * 100))

            started = time.perf_counter()
            await asyncio.gather(*(producer(tasks // PRODUCERS) for _ in range(PRODUCERS)))
            concurrent = (tasks // PRODUCERS * PRODUCERS) / (time.perf_counter() - started)
        drain = await asyncio.to_thread(
            drain_with_worker,
            address,
            materials.worker if secured else None,
            credentials,
            tasks // PRODUCERS * PRODUCERS,
            url,
        )
    finally:
        await server.stop()
    return {"sequential": sequential, "concurrent": concurrent, "drain": drain}


def drain_with_worker(
    address: str, token: str | None, credentials: dict[str, Any], expected: int, url: str
) -> float:
    worker = Worker(address, concurrency=64, token=token, **credentials)
    worker.register_handler("bench.drain", lambda _ctx, _payload: None)
    started = time.perf_counter()
    worker.start(timeout=timedelta(seconds=30))
    try:
        while asyncio.run(count_succeeded(url)) < expected:
            time.sleep(0.05)
    finally:
        elapsed = time.perf_counter() - started
        worker.stop()
    return expected / elapsed


async def count_succeeded(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        succeeded: int = await conn.fetchval(
            "SELECT count(*) FROM conveyor_tasks WHERE type = 'bench.drain' AND state = 'succeeded'"
        )
    finally:
        await conn.close()
    return succeeded


async def main(repeat: int, tasks: int) -> None:
    results: dict[str, list[dict[str, float]]] = {setup: [] for setup in SETUPS}
    with tempfile.TemporaryDirectory(prefix="cvsec-") as scratch:
        postgres = EmbeddedPostgres(Path(scratch) / "pg")
        admin_url = postgres.start()
        try:
            materials = Materials(Path(scratch))
            for round_number in range(repeat):
                for setup in SETUPS:  # by turns, so drift in the machine hits all alike
                    name = f"bench_{round_number}_{SETUPS.index(setup)}"
                    url = await fresh_database(admin_url, name)
                    results[setup].append(await run_setup(setup, url, materials, tasks))
                    print(f"round {round_number + 1} {setup}: {results[setup][-1]}", flush=True)
        finally:
            postgres.stop()
    medians = {
        setup: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for setup, runs in results.items()
    }
    print(f"\n{'set-up':<18} {'sequential /s':>14} {'32 concurrent /s':>17} {'drain /s':>10}")
    plain = medians["plain"]
    for setup, numbers in medians.items():
        cells = [
            f"{numbers[key]:,.0f} ({numbers[key] / plain[key]:.2f}x)"
            for key in ("sequential", "concurrent", "drain")
        ]
        print(f"{setup:<18} {cells[0]:>14} {cells[1]:>17} {cells[2]:>10}")
    out = Path(__file__).parent / "results" / "security_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"runs": results, "medians": medians}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=3000)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.repeat, arguments.tasks))
