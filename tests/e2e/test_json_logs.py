"""`conveyor --log-format json`: real worker and server processes write only JSON lines.

The worker runs tests/worker_apps.py:worker. Its handlers `log_line` (a thread) and
`async_log_line` (the event loop) log with the application's own stdlib logger, and
`always_fail` raises; every line about those tasks, the application's included, must carry
the task's id, type, attempt and the worker's id.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
from helpers import conveyor_command, free_port, wait_final, wait_for

from conveyor import Task, TaskState

BASE_KEYS = {"ts", "level", "logger", "message"}


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line of `output` as a JSON object; fails on the first line that is not one."""
    documents = []
    for number, line in enumerate(output.splitlines(), start=1):
        try:
            document = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"line {number} is not JSON: {line!r}\n{output}")
        assert isinstance(document, dict), line
        assert set(document) >= BASE_KEYS, line
        documents.append(document)
    return documents


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "env"])
def test_worker_lines_are_json_and_carry_the_task_fields(how, server, client, processes, ledger):
    worker_args = ["worker", "worker_apps:worker", "--server", server.address]
    if how == "flag":
        argv = conveyor_command("--log-format", "json", "--log-level", "debug", *worker_args)
        env = {}
    else:
        argv = conveyor_command(*worker_args)
        env = {"CONVEYOR_LOG_FORMAT": "json", "CONVEYOR_LOG_LEVEL": "debug"}
    worker = processes(
        argv, name=f"json-worker-{how}", CONVEYOR_TEST_LEDGER=str(ledger.path), **env
    )
    sync_id = client.enqueue_task(Task(type="log_line", payload=b"from a thread"))
    async_id = client.enqueue_task(Task(type="async_log_line", payload=b"from the loop"))
    fail_id = client.enqueue_task(Task(type="always_fail", payload=b"kaboom", max_retries=1))
    finals = {task_id: wait_final(client, task_id) for task_id in (sync_id, async_id, fail_id)}
    assert finals[sync_id].state is TaskState.SUCCEEDED
    assert finals[async_id].state is TaskState.SUCCEEDED
    assert finals[fail_id].state is TaskState.FAILED
    assert finals[fail_id].attempts == 2
    worker_id = finals[sync_id].worker_id
    assert worker_id is not None

    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()
    lines = json_lines(worker.output())

    # Every line of the worker's own says which worker it is.
    worker_lines = [line for line in lines if line["logger"].startswith("conveyor.worker")]
    assert {line.get("worker_id") for line in worker_lines} == {worker_id}
    events = [line.get("event") for line in worker_lines]
    assert {"worker_registered", "worker_draining", "worker_stopped"} <= set(events)

    types = {sync_id: "log_line", async_id: "async_log_line", fail_id: "always_fail"}
    about = {
        task_id: [line for line in lines if line.get("task_id") == task_id] for task_id in types
    }
    for task_id, task_lines in about.items():
        assert task_lines, f"no line about {types[task_id]}"
        for line in task_lines:
            assert line["task_type"] == types[task_id], line
            assert line["worker_id"] == worker_id, line
            assert isinstance(line["attempt"], int), line
            assert line["lease_id"], line
    # A line that names a task in its text is tagged with it.
    for line in lines:
        for task_id in types:
            if task_id in line["message"]:
                assert line.get("task_id") == task_id, line

    # The application's own lines, from a handler thread and from the event loop.
    for task_id, text in ((sync_id, "from a thread"), (async_id, "from the loop")):
        [said] = [line for line in about[task_id] if line.get("event") == "handler_says"]
        assert said["logger"] == "worker_apps.handler"
        assert said["message"] == f"handling {text}"
        assert (said["level"], said["attempt"]) == ("info", 1)

    # The runtime's lines about each attempt: started (debug), and the failures.
    started = {
        (line["task_id"], line["attempt"]) for line in lines if line.get("event") == "task_started"
    }
    assert started == {(sync_id, 1), (async_id, 1), (fail_id, 1), (fail_id, 2)}
    failed = [line for line in about[fail_id] if line.get("event") == "task_attempt_failed"]
    assert [line["attempt"] for line in failed] == [1, 2]
    assert all("ValueError: kaboom" in line["message"] for line in failed)
    # Lease ids differ per attempt.
    assert failed[0]["lease_id"] != failed[1]["lease_id"]


@pytest.mark.slow
def test_server_lines_are_json(database_url, processes):
    """No banner in JSON mode: the server logs the same facts as a record."""
    http_port = free_port()
    server = processes(
        conveyor_command(
            "--log-format",
            "json",
            "server",
            "--database-url",
            database_url,
            "--grpc-listen",
            f"127.0.0.1:{free_port()}",
            "--http-listen",
            f"127.0.0.1:{http_port}",
        ),
        name="json-server",
    )
    wait_for(
        lambda: any(
            line.endswith("\n") and json.loads(line).get("event") == "server_started"
            for line in server.output().splitlines(keepends=True)
        ),
        timeout=30,
        what="the server to log that it started",
    )
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0, server.output()
    lines = json_lines(server.output())
    [started] = [line for line in lines if line.get("event") == "server_started"]
    assert f"HTTP on port {http_port}" in started["message"]
    assert any(line.get("event") == "stopped" for line in lines)
