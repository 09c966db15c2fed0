"""A process that forks while a Client's enqueue stream is open: the child must not crash.

A sync `Client` keeps a stream open with a reader thread waiting inside grpc. A fork that
cannot use vfork (subprocess with `preexec_fn`, `user=` or `group=`: how the embedded
PostgreSQL's pg_ctl is run as root) used to run grpc's C-core fork handlers in the child,
which restarted grpc's threads in a half-copied interpreter: about one fork in ten
segfaulted before its exec. `import conveyor` turns those handlers off
(GRPC_ENABLE_FORK_SUPPORT=false unless the application set it).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from conveyor import Client, Task

FORKS = 200


def test_forks_beside_an_open_enqueue_stream_all_exec(server: Any) -> None:
    assert os.environ.get("GRPC_ENABLE_FORK_SUPPORT") == "false"
    failed: list[int] = []
    with Client(server.address) as client:
        client.enqueue_task(Task(type="fork.safety"))
        for n in range(FORKS):
            if n % 10 == 0:  # keep the stream busy: answers arrive while the forks happen
                client.enqueue_task(Task(type="fork.safety"))
            # preexec_fn makes subprocess fork() instead of vfork(), as user= does.
            result = subprocess.run(["/bin/true"], preexec_fn=os.getpid, check=False)
            if result.returncode != 0:
                failed.append(result.returncode)
    assert failed == [], f"{len(failed)} of {FORKS} children died: {set(failed)}"
