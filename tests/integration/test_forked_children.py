"""A child forked from a process that used gRPC: what its own new clients can do.

gRPC's fork support is off (conveyor/__init__.py), and a child forked while its parent held
gRPC connections inherits gRPC's state without the threads that run it: its own new client
never connected. An enqueue waited out the whole retry budget and blamed the server (which
was up), and a unary call hung past its deadline, while the docs said "create a client in
the child". Such a child is now told at once, by ConfigError, why and what to do instead;
a child of a parent that made a client but never connected (a prefork web server's
workers, with the client made at import) makes its own, and it works.

Each case runs in a fresh interpreter: this test process holds connections and a server
of its own, so a child forked from it could not use gRPC whatever Conveyor did.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

BUDGET = 3.0

SCRIPT = textwrap.dedent(
    f"""
    import asyncio, multiprocessing, sys, time, uuid
    from conveyor import AsyncClient, Client, RetryPolicy, Task

    ADDRESS, PARENT, CALL = sys.argv[1], sys.argv[2], sys.argv[3]
    RETRY = RetryPolicy(total_timeout={BUDGET})

    async def with_async_client() -> None:
        async with AsyncClient(ADDRESS, retry=RETRY) as own:
            await own.enqueue_task(Task(type="fork.child"))

    def in_child() -> str:
        started = time.monotonic()
        try:
            if CALL == "async-enqueue":
                asyncio.run(with_async_client())
            else:
                with Client(ADDRESS, retry=RETRY) as own:
                    if CALL == "enqueue":
                        own.enqueue_task(Task(type="fork.child"))
                    else:
                        own.get_task_status(str(uuid.uuid4()))
            said = "ok"
        except Exception as exc:
            said = f"{{type(exc).__name__}}: {{exc}}"
        return f"{{time.monotonic() - started:.2f}} {{said}}"

    if __name__ == "__main__":
        parent = Client(ADDRESS)  # made at import, as a prefork web server's app does
        if PARENT == "connected":
            parent.enqueue_task(Task(type="fork.parent"))
        pool = multiprocessing.get_context("fork").Pool(1)
        try:
            print(pool.apply_async(in_child).get(60))
        except multiprocessing.TimeoutError:
            print("60 HUNG")
        pool.terminate()
        parent.close()
    """
)


def in_a_forked_child(address: str, parent: str, call: str) -> tuple[float, str]:
    """Run `call` with a client made in a forked child; (seconds, what it said)."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, address, parent, call],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    elapsed, said = result.stdout.strip().splitlines()[-1].split(" ", 1)
    return float(elapsed), said


@pytest.mark.parametrize("call", ["enqueue", "get_task_status", "async-enqueue"])
def test_a_child_forked_while_the_parent_held_connections_is_told_at_once(
    server: Any, call: str
) -> None:
    elapsed, said = in_a_forked_child(server.address, "connected", call)
    assert said.startswith("ConfigError: this process was forked from process"), said
    assert "'spawn' or 'forkserver'" in said
    assert elapsed < 1, said


def test_a_child_of_a_parent_that_never_connected_makes_its_own(server: Any, db: Any) -> None:
    elapsed, said = in_a_forked_child(server.address, "made", "enqueue")
    assert said == "ok", said
    assert elapsed < BUDGET
    assert db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE type = 'fork.child'") == 1
