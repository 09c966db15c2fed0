"""Clients adopted across forks: children, grandchildren, and a fork during a first call.

Each case runs in a fresh interpreter (this test process holds gRPC connections).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

FORK_TREE = textwrap.dedent(
    """
    import os, sys, time
    from conveyor import Client, RetryPolicy, Task
    from conveyor.errors import ConfigError

    ADDRESS, MODE = sys.argv[1], sys.argv[2]
    client = Client(ADDRESS, retry=RetryPolicy(total_timeout=3))

    def use(tag):
        try:
            client.enqueue_task(Task(type="fork.tree"))
            said = "ok"
        except ConfigError:
            said = "ConfigError"
        except Exception as exc:
            said = type(exc).__name__
        print(f"{tag} {said}", flush=True)

    def fork(fn):
        pid = os.fork()
        if pid == 0:
            try:
                fn()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)

    def child1():
        use("child1")
        fork(lambda: use("grandchild1"))  # its parent connected: refused

    def child2():
        fork(lambda: use("grandchild2"))  # nobody connected: adopted
        use("child2")

    fork(child1)
    fork(child2)
    fork(lambda: use("child3"))
    if MODE == "other":
        other = Client(ADDRESS)
        other.get_status()
        fork(lambda: use("child-after-other"))  # the parent connected another client
    """
)


@pytest.mark.parametrize("mode", ["alone", "other"])
def test_fork_adoption_across_children_and_grandchildren(server: Any, mode: str) -> None:
    """Passes; the prefork test covers one child only."""
    result = subprocess.run(
        [sys.executable, "-c", FORK_TREE, server.address, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    expected = {
        "child1": "ok",
        "grandchild1": "ConfigError",
        "grandchild2": "ok",
        "child2": "ok",
        "child3": "ok",
    }
    if mode == "other":
        expected["child-after-other"] = "ConfigError"
    assert said == expected, result.stderr[-2000:]


MID_FIRST_CALL = textwrap.dedent(
    """
    import faulthandler, os, sys, threading, time
    from conveyor import Client, RetryPolicy
    from conveyor.errors import ConfigError

    client = Client(sys.argv[1], retry=RetryPolicy(total_timeout=3))
    # A thread of the parent starts the client's first call as the main thread forks.
    threading.Thread(target=client.get_status, daemon=True).start()
    pid = os.fork()
    if pid == 0:
        faulthandler.dump_traceback_later(8, exit=True)  # a hang: its stack, then exit
        started = time.monotonic()
        try:
            client.get_status()
            said = "ok"
        except ConfigError:
            said = "ConfigError"
        except BaseException as exc:
            said = type(exc).__name__
        print(f"{said} {time.monotonic() - started:.2f}", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    """
)


def test_a_child_forked_while_the_parent_makes_its_first_call_answers_at_once(
    server: Any,
) -> None:
    """The child adopts the client, since it has no channel yet; it must then either work
    or refuse at once (ConfigError, as before the adoption), never hang past its retry
    budget (3 s) and every deadline."""
    outcomes = []
    for _ in range(6):
        result = subprocess.run(
            [sys.executable, "-c", MID_FIRST_CALL, server.address],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        said = result.stdout.split()
        if said and said[0] in {"ok", "ConfigError"} and float(said[1]) < 4:
            outcomes.append(said[0])
        else:
            outcomes.append("hung:\n" + result.stderr[-1500:])
    hung = [outcome for outcome in outcomes if outcome.startswith("hung")]
    assert not hung, f"{len(hung)} of {len(outcomes)} children hung; the first:\n{hung[0]}"
