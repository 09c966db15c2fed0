"""A prefork web server (gunicorn --preload, uWSGI without lazy-apps) with the Conveyor
client made at import, as the docs recommend.

docs/getting-started.md: "in a prefork web server make the client at import if you like,
but call it only in the workers"; docs/architecture.md: "a prefork web server's app may
make its client at import, as long as the parent never calls it"; and the ConfigError a
child gets when its parent had connected says "in a prefork web server: a client made at
import is fine, but used first in each worker, never in the parent".

The app module below does exactly that: `client = Client(...)` at import, in the master,
which never calls it; each forked worker then calls `client.enqueue_task` for a request.
Each case runs in a fresh interpreter (this test process holds gRPC connections, so a
child forked from it could not use gRPC whatever Conveyor did), and the worker is forked
with os.fork() as gunicorn does; a hang fails on the subprocess timeout.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys
    from conveyor import AsyncClient, Client, RetryPolicy, Task

    ADDRESS, KIND = sys.argv[1], sys.argv[2]
    RETRY = RetryPolicy(total_timeout=3)
    # The app module, imported once in the master (--preload).
    client = Client(ADDRESS, retry=RETRY) if KIND == "sync" else AsyncClient(ADDRESS, retry=RETRY)

    def handle_request() -> str:  # a view in a worker
        if KIND == "sync":
            return client.enqueue_task(Task(type="prefork.request"))
        return asyncio.run(client.enqueue_task(Task(type="prefork.request")))

    pid = os.fork()
    if pid == 0:
        try:
            handle_request()
            print("ok", flush=True)
        except Exception as exc:
            print(f"{type(exc).__name__}: {exc}", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    """
)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_client_made_at_import_in_a_prefork_master_works_in_its_workers(
    server: Any, db: Any, kind: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, server.address, kind],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    said = result.stdout.strip()
    assert said == "ok", (
        f"the worker's call on the client made at import (as the docs advise) said: {said}"
    )
    assert db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE type = 'prefork.request'") == 1
