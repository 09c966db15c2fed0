"""Rolling upgrade: producers (and operators' clients) of older releases against a server of
this release, on a database this release migrated.

operations.md: "an old client keeps calling EnqueueTasks". The older clients are the
repository's own history (`git archive <rev>`), run in a subprocess with PYTHONPATH at
their sources; they print what each call returned or raised as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import (
    OLD_LONG_POLL_RELEASE,
    OLD_SCHEMA_15_RELEASE,
    old_release,
    succeed_as_a_worker,
)

from conveyor import Client, Task, TaskState

OLD_REVS = (OLD_LONG_POLL_RELEASE, OLD_SCHEMA_15_RELEASE)
pytestmark = pytest.mark.slow


SCRIPT = r"""
import json, sys, traceback
from conveyor import Client, Task
import conveyor.errors as errors

address, finished_id = sys.argv[1], sys.argv[2]
out = {}

def attempt(name, fn):
    try:
        value = fn()
        out[name] = {"ok": True, "value": value}
    except errors.ConveyorError as exc:
        out[name] = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    except Exception as exc:
        out[name] = {"ok": False, "error": "UNTYPED " + type(exc).__name__,
                     "message": traceback.format_exc()}

with Client(address) as client:
    attempt("enqueue", lambda: client.enqueue_task(Task(type="t.one", payload=b"p")))
    attempt("enqueue_tasks", lambda: client.enqueue_tasks(
        [Task(type="t.many", payload=b"%d" % i) for i in range(5)]))
    one = out["enqueue"].get("value")
    attempt("get", lambda: (lambda s: [s.id, s.state.value, s.type])(
        client.get_task_status(one, history=True)))
    attempt("cancel", lambda: client.cancel_task(one).state.value)
    attempt("cancel_again", lambda: client.cancel_task(one).state.value)
    attempt("cancel_finished", lambda: client.cancel_task(finished_id).state.value)
    attempt("get_unknown", lambda: client.get_task_status(
        "01a23db2-0000-7000-8000-000000000000").state.value)
    attempt("cancel_unknown", lambda: client.cancel_task(
        "01a23db2-0000-7000-8000-000000000000").state.value)
    attempt("get_malformed", lambda: client.get_task_status("not-a-uuid").state.value)
    attempt("too_large", lambda: client.enqueue_task(Task(type="t.big", payload=b"x" * 5000)))
    attempt("too_large_many", lambda: client.enqueue_tasks(
        [Task(type="t.big", payload=b"x" * 10), Task(type="t.big", payload=b"x" * 5000)]))
    attempt("status", lambda: client.get_status().queued if hasattr(client.get_status(), "queued")
            else repr(client.get_status())[:200])
    attempt("workers", lambda: len(client.list_workers()))
    attempt("explain", lambda: client.explain_task(one))
    attempt("list_tasks", lambda: len(client.list_tasks().tasks)
            if hasattr(client.list_tasks(), "tasks") else repr(client.list_tasks())[:100])
    attempt("pause", lambda: client.pause_type("t.many", reason="upgrade"))
    attempt("resume", lambda: client.resume_type("t.many"))
    attempt("cancel_tasks", lambda: repr(client.cancel_tasks(type="t.many"))[:300])
    attempt("retry_tasks", lambda: repr(client.retry_tasks(type="t.many"))[:300])
print("RESULT " + json.dumps(out))
"""


def run_old_client(rev: str, address: str, finished_id: str) -> dict:
    tree = old_release(rev)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree / "src")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, address, finished_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tree,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout + done.stderr
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.parametrize("rev", OLD_REVS)
def test_old_client_against_a_new_server(rev, start_server) -> None:
    server = start_server(max_payload_bytes=1000)
    with Client(server.address) as client:
        finished = client.enqueue_task(Task(type="t.done"))
        succeed_as_a_worker(server.address, "t.done")
        assert client.get_task_status(finished).state is TaskState.SUCCEEDED
        out = run_old_client(rev, server.address, finished)
        assert out["enqueue"]["ok"], out["enqueue"]
        assert out["enqueue_tasks"]["ok"], out["enqueue_tasks"]
        assert len(out["enqueue_tasks"]["value"]) == 5
        assert out["get"]["ok"], out["get"]
        assert out["get"]["value"][1] == "queued", out["get"]
        assert out["cancel"] == {"ok": True, "value": "cancelled"}, out["cancel"]
        assert client.get_task_status(out["enqueue"]["value"]).state is TaskState.CANCELLED
        assert out["cancel_finished"]["error"] == "TaskAlreadyFinished", out["cancel_finished"]
        assert out["get_unknown"]["error"] == "TaskNotFound", out["get_unknown"]
        assert out["cancel_unknown"]["error"] == "TaskNotFound", out["cancel_unknown"]
        assert out["get_malformed"]["error"] in ("InvalidTask", "TaskNotFound"), out
        assert out["too_large"]["error"] == "InvalidTask", out["too_large"]
        assert out["too_large_many"]["error"] == "InvalidTask", out["too_large_many"]
        untyped = {k: v for k, v in out.items() if str(v.get("error", "")).startswith("UNTYPED")}
        assert not untyped, untyped
        generic = {k: v for k, v in out.items() if v.get("error") == "ConveyorError"}
        assert not generic, generic
