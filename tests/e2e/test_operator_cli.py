"""The operator commands as an operator runs them: `tasks list/show/retry/cancel`, `pause`,
`resume` and `stats`, as real processes against a real server, worker and PostgreSQL,
checked against what the client and the handlers' ledger independently see."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import conveyor_command, process_env, wait_final, wait_for

from conveyor import Task, TaskState
from conveyor.errors import InvalidTask

UNHANDLED = "nobody.handles"


@pytest.fixture(autouse=True)
def server_address(server, monkeypatch):
    """Every `conveyor` command of these tests talks to this test's server."""
    monkeypatch.setenv("CONVEYOR_SERVER", server.address)
    return server.address


def run(*args: str, stdin: int = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """Run `conveyor ARGS...` with no terminal on stdin (unless given) and capture output."""
    return run_all(args, stdin=stdin)[0]


def run_all(
    *commands: tuple[str, ...], stdin: int = subprocess.DEVNULL
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent `conveyor` commands at the same time: each one starts a Python."""
    processes = [
        subprocess.Popen(
            conveyor_command(*args),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=process_env(),
        )
        for args in commands
    ]
    results = []
    for args, process in zip(commands, processes, strict=True):
        stdout, stderr = process.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    return results


def ok(*args: str) -> str:
    return succeeded(run(*args))


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    """Exit status 0 and nothing on stderr; returns stdout."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stderr == "", result.stderr
    return result.stdout


def one_error_line(result: subprocess.CompletedProcess[str], *, stdout: str = "") -> str:
    """Exit status 1, `stdout` on stdout, exactly one `error: ...` line on stderr."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stdout == stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def page(result: subprocess.CompletedProcess[str]) -> tuple[list[str], str | None]:
    """The ids and next page token of a `tasks list --json` run."""
    document = json.loads(succeeded(result))
    return [task["id"] for task in document["tasks"]], document["next_page_token"]


def listed_ids(*args: str) -> tuple[list[str], str | None]:
    document = json.loads(ok("tasks", "list", "--json", *args))
    return [task["id"] for task in document["tasks"]], document["next_page_token"]


def states(client, task_ids) -> list[TaskState]:
    return [client.get_task_status(task_id).state for task_id in task_ids]


def enqueue(client, task_type: str, payload: bytes = b"", **options) -> str:
    return client.enqueue_task(Task(type=task_type, payload=payload, **options))


@pytest.mark.slow
class TestListAndShow:
    def test_list_and_show(self, server, client, spawn_worker):
        """Filters pick exactly the matching tasks, newest first; pages cover every task once;
        show prints the fields, a payload preview (text or hex), the explanation, the timeline.
        """
        spawn_worker(server.address)
        text = "input: héllo [/bold]".encode()  # not UTF-8-only ASCII, and not markup
        binary = bytes(range(256)) + b"\xff" * 44  # 300 bytes, not UTF-8
        created = {}  # name -> id, enqueued one by one so the queue order is this order
        for name, task_type, payload in [
            ("ok1", "noop", b""),
            ("fail1", "permanent_fail", text),
            ("idle1", UNHANDLED, binary),
            ("ok2", "noop", b""),
            ("fail2", "permanent_fail", b""),
            ("idle2", UNHANDLED, b""),
        ]:
            created[name] = enqueue(client, task_type, payload)
        for name in ("ok1", "ok2", "fail1", "fail2"):
            wait_final(client, created[name])
        failed = client.get_task_status(created["fail1"], history=True)
        newest_first = list(reversed(created.values()))
        failed_or_queued = [created[name] for name in ("idle2", "fail2", "idle1", "fail1")]
        both_states = ("--state", "failed", "--state", "queued")

        results = run_all(
            ("tasks", "list", "--json"),
            ("tasks", "list", "--json", *both_states),
            ("tasks", "list", "--json", "--type", "noop"),
            ("tasks", "list", "--json", "--limit", "4"),
            ("tasks", "list", "--limit", "3", *both_states),
            ("tasks", "list", "--page-token", "abc"),
            ("tasks", "show", created["fail1"]),
            ("tasks", "show", created["fail1"], "--json"),
            ("tasks", "show", created["idle1"]),
            ("tasks", "show", created["idle1"], "--json"),
        )
        listing, by_state, by_type, first, table, bad_token, *shown = results

        assert page(listing) == (newest_first, None)
        assert page(by_state) == (failed_or_queued, None)
        noop = json.loads(succeeded(by_type))["tasks"]
        assert [task["id"] for task in noop] == [created["ok2"], created["ok1"]]
        assert {(task["state"], task["attempts"], task["max_retries"]) for task in noop} == {
            ("succeeded", 1, 3)
        }
        first_ids, token = page(first)
        assert token is not None
        second_ids, last_token = page(
            run("tasks", "list", "--json", "--limit", "4", "--page-token", token)
        )
        assert last_token is None
        assert first_ids + second_ids == newest_first

        out = succeeded(table)
        in_table = sorted(
            (out.index(task_id), task_id) for task_id in newest_first if task_id in out
        )
        assert [task_id for _, task_id in in_table] == failed_or_queued[:3]
        assert out.count("this input can never succeed") == 1
        assert re.search(
            r"^more: add --page-token \d+ \(with the same filters\)$", out, re.MULTILINE
        )
        assert "malformed page token" in one_error_line(bad_token)

        show_failed, show_failed_json, show_idle, show_idle_json = shown
        out = succeeded(show_failed)
        for expected in (
            created["fail1"],
            "permanent_fail",
            "input: héllo [/bold]",  # as text, not read as markup
            f"{len(text)} byte(s), UTF-8 text",
            "failed for good after 1 attempt(s)",
            "PermanentFailure: this input can never succeed",
            failed.worker_id,
        ):
            assert expected in out
        timeline = out.split("timeline", 1)[1]
        events = re.findall(r"\d\d\.\d{3} UTC\W+(\w+)", timeline)
        assert events == ["enqueued", "started", "failed"], timeline

        document = json.loads(succeeded(show_failed_json))
        assert (document["id"], document["state"]) == (created["fail1"], "failed")
        assert document["payload"] == {
            "size": len(text),
            "encoding": "utf-8",
            "preview": text.decode(),
            "truncated": False,
        }
        assert [
            (event["event"], event["state"], event["attempt"], event["worker_id"])
            for event in document["history"]
        ] == [
            (event.event, event.state.value, event.attempt, event.worker_id)
            for event in failed.history
        ]
        assert [event["event"] for event in document["history"]] == [
            "enqueued",
            "started",
            "failed",
        ]
        assert document["explanation"] == client.explain_task(created["fail1"])

        assert json.loads(succeeded(show_idle_json))["payload"] == {
            "size": 300,
            "encoding": "hex",
            "preview": binary[:200].hex(),
            "truncated": True,
        }
        out = succeeded(show_idle)
        assert "300 byte(s), binary, shown as hex, first 200 shown" in out
        assert binary[:200].hex()[:100] in out
        assert f"no live worker handles type '{UNHANDLED}'" in out


@pytest.mark.slow
class TestRetryAndCancel:
    def test_by_id(self, server, client, spawn_worker, ledger):
        """Cancel, then retry by id; a task in the wrong state is named in one error line."""
        cancelled = enqueue(client, "noop")  # no worker yet: it stays queued
        assert ok("tasks", "cancel", cancelled).splitlines() == [f"{cancelled} cancelled"]
        assert ok("tasks", "cancel", cancelled).splitlines() == [
            f"{cancelled} cancelled (it already was)"
        ]
        assert client.get_task_status(cancelled).state is TaskState.CANCELLED

        spawn_worker(server.address)
        failed = enqueue(client, "permanent_fail")
        assert wait_final(client, failed).state is TaskState.FAILED

        out = ok("tasks", "retry", cancelled, failed, "--reason", "fixed upstream")
        assert out.splitlines() == [f"{cancelled} retried", f"{failed} retried"]
        status = wait_final(client, cancelled)
        assert status.state is TaskState.SUCCEEDED
        assert [event.event for event in status.history] == [
            "enqueued",
            "cancelled",
            "retried",
            "started",
            "succeeded",
        ]
        assert status.history[2].detail == "fixed upstream"
        status = wait_final(client, failed)
        assert status.state is TaskState.FAILED
        assert status.attempts == 1  # a new series of attempts
        assert [row["task_id"] for row in ledger.started()].count(failed) == 2

        missing = str(uuid.uuid4())
        retry_done, cancel_done, retry_missing = run_all(
            ("tasks", "retry", cancelled),
            ("tasks", "cancel", cancelled),
            ("tasks", "retry", missing),
        )
        assert one_error_line(retry_done) == (
            f"error: task {cancelled} is succeeded; only failed or cancelled tasks can be retried"
        )
        assert one_error_line(cancel_done) == (
            f"error: task {cancelled} is succeeded; only queued or running tasks can be cancelled"
        )
        assert one_error_line(retry_missing) == f"error: task {missing} not found"
        assert len(client.get_task_status(cancelled, history=True).history) == 5

        # Several ids: the applicable one changes, the other is reported, the exit says so.
        line = one_error_line(
            run("tasks", "retry", cancelled, failed), stdout=f"{failed} retried\n"
        )
        assert f"task {cancelled} is succeeded" in line

    def test_by_filter(self, server, client):
        """A filter counts first, needs confirmation, and changes exactly the matching tasks."""
        targets = [enqueue(client, "bulk.idle") for _ in range(3)]
        others = [enqueue(client, "other.idle") for _ in range(2)]
        everything = targets + others
        args = ("tasks", "cancel", "--type", "bulk.idle")

        refused, *bad = run_all(
            args,
            ("tasks", "retry", targets[0], "--type", "bulk.idle"),
            ("tasks", "retry"),
            ("tasks", "cancel", targets[0], "--limit", "1"),
        )
        line = one_error_line(
            refused, stdout="3 task(s) match: state queued or running, type bulk.idle\n"
        )
        assert line == (
            "error: refusing to cancel 3 task(s) without confirmation: "
            "stdin is not a terminal (pass --yes)"
        )
        for result, expected in zip(
            bad,
            [
                "give task ids or a filter (--state, --type), not both",
                "give the ids of the tasks to retry, or a filter: --state, --type",
                "--limit applies to a filter, not to task ids",
            ],
            strict=True,
        ):
            assert one_error_line(result) == f"error: {expected}"
        # Declining is the operator's choice, not an error (it was `error:` and status 1).
        declined = run_on_terminal(*args, answer="n")
        assert declined.returncode == 0, declined
        assert declined.stdout == "3 task(s) match: state queued or running, type bulk.idle\n"
        assert declined.stderr == "Cancel 3 task(s)? [y/N]: not confirmed; no task cancelled\n"
        # Ctrl-C at the question: status 130, as for any interrupted command (it was 1).
        assert interrupted_at_the_question(*args) == 130
        assert states(client, everything) == [TaskState.QUEUED] * 5

        out = ok(*args, "--yes", "--reason", "bad batch")
        assert out.splitlines() == [
            "3 task(s) match: state queued or running, type bulk.idle",
            "3 task(s) cancelled",
        ]
        assert states(client, targets) == [TaskState.CANCELLED] * 3
        assert states(client, others) == [TaskState.QUEUED] * 2
        assert client.get_task_status(targets[0], history=True).history[-1].detail == "bad batch"

        out = ok("tasks", "retry", "--state", "cancelled", "--limit", "2", "--yes")
        assert out.splitlines() == [
            "2 task(s) match: state cancelled (at most 2)",
            "2 task(s) retried",
        ]
        # In queue order: the two enqueued first.
        assert states(client, targets) == [TaskState.QUEUED, TaskState.QUEUED, TaskState.CANCELLED]

        assert ok("tasks", "retry", "--type", "other.idle", "--yes").splitlines() == [
            "0 task(s) match: state failed or cancelled, type other.idle"
        ]
        assert states(client, everything) == [
            TaskState.QUEUED,
            TaskState.QUEUED,
            TaskState.CANCELLED,
            *[TaskState.QUEUED] * 2,
        ]

    def test_tasks_that_move_on_after_the_count_are_said(self, server, client):
        """Counted, then one was cancelled by its producer while the operator read the
        question: the action leaves it alone and says so (it printed "3 task(s) match" and
        "2 task(s) cancelled", with nothing to say where the third went)."""
        targets = [enqueue(client, "bulk.moving") for _ in range(3)]
        with at_the_question("tasks", "cancel", "--type", "bulk.moving") as (child, terminal):
            client.cancel_task(targets[1])
            os.write(terminal, b"y\n")
            out, _ = child.communicate(timeout=30)
        assert child.returncode == 0
        assert out.decode().splitlines() == [
            "3 task(s) match: state queued or running, type bulk.moving",
            (
                "2 task(s) cancelled; 1 no longer queued or running by then (changed, or "
                "deleted by retention), left alone"
            ),
        ]
        assert states(client, targets) == [TaskState.CANCELLED] * 3


def run_on_terminal(*args: str, answer: str) -> subprocess.CompletedProcess[str]:
    """Run `conveyor ARGS...` with a terminal on stdin that has `answer` typed into it."""
    controller, terminal = pty.openpty()
    try:
        os.write(controller, f"{answer}\n".encode())
        return run(*args, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)


def reading_stdin(pid: int) -> bool:
    """Whether the process's main thread is blocked reading file descriptor 0.

    /proc/PID/syscall: the number of the system call it waits in, then its arguments, the
    first a read's descriptor ("running" while it runs).
    """
    fields = Path(f"/proc/{pid}/syscall").read_text().split()
    return len(fields) > 1 and fields[1] == "0x0"


@contextlib.contextmanager
def at_the_question(*args: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run `conveyor ARGS...` on a terminal until it waits for the answer to its [y/N]:
    the process (stdout and stderr piped) and the terminal's controlling end to answer on."""
    controller, terminal = pty.openpty()
    child = subprocess.Popen(
        conveyor_command(*args),
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=process_env(),
    )
    try:
        assert child.stderr is not None
        asked = b""
        deadline = time.monotonic() + 30
        while b"[y/N]" not in asked:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no question asked: {asked!r}"
            if select.select([child.stderr], [], [], remaining)[0]:
                chunk = os.read(child.stderr.fileno(), 4096)
                assert chunk, f"exited without asking: {asked!r}"
                asked += chunk
        # Only once it reads the terminal: a SIGINT that comes between the prompt's write
        # and its read is noted by Python and then waited on with the read (CPython's
        # input() does not see it), which a loaded machine hit about one run in three. A
        # person's Ctrl-C comes long after.
        wait_for(
            lambda: reading_stdin(child.pid), timeout=30, what="the command to read its answer"
        )
        yield child, controller
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
        os.close(terminal)
        os.close(controller)


def interrupted_at_the_question(*args: str) -> int:
    """Run `conveyor ARGS...` on a terminal, Ctrl-C (SIGINT) it at its [y/N]; its status."""
    with at_the_question(*args) as (child, _terminal):
        child.send_signal(signal.SIGINT)
        status = child.wait(30)
        assert child.stderr is not None
        assert child.stderr.read().decode().strip() == "Aborted!"
        return status


@pytest.mark.slow
class TestPauseResumeAndStats:
    def test_pause_holds_a_type_and_stats_show_it(self, server, client, spawn_worker, ledger):
        """A paused type is not leased while the same worker runs other types; resume frees it."""
        spawn_worker(server.address)
        assert ok("pause", "async_noop", "--reason", "maintenance") == "async_noop paused\n"
        assert ok("pause", "async_noop") == "async_noop was already paused\n"

        held = enqueue(client, "async_noop")
        # Enqueued after `held`: the claim that hands it out would have taken `held` first
        # (oldest first) had the pause not skipped it, so its success proves a poll happened.
        probe = enqueue(client, "noop")
        assert wait_final(client, probe).state is TaskState.SUCCEEDED
        assert client.get_task_status(held).state is TaskState.QUEUED
        assert held not in {row["task_id"] for row in ledger.started()}
        out = ok("tasks", "explain", held)
        assert "its type 'async_noop' is paused (maintenance)" in out
        assert "until `conveyor resume async_noop`" in out

        def sampled():
            status = client.get_status()
            by_type = {item.type: item for item in status.types}
            held_type = by_type.get("async_noop")
            return (
                held_type is not None
                and held_type.queued == 1
                and status.succeeded_last_minute == 1
                and status.workers.get("active") == 1
            )

        wait_for(sampled, what="the server's stats sample to include the held task")
        document = json.loads(ok("stats", "--json"))
        (entry,) = [item for item in document["types"] if item["type"] == "async_noop"]
        assert entry["queued"] == 1
        assert entry["running"] == 0
        assert entry["oldest_queued_seconds"] > 0
        assert entry["paused"] is True
        assert entry["paused_reason"] == "maintenance"
        assert [item["type"] for item in document["paused_types"]] == ["async_noop"]
        assert document["workers"] == {"active": 1}
        # Throughput over the window the server sampled, 55 to 60 s, as /status gives it
        # (test_http_and_migrations.py): not over 60 s whatever the window was.
        window = document["last_minute"]["window_seconds"]
        assert 55 <= window <= 60
        assert document["last_minute"] == {
            "succeeded": 1,
            "failed": 0,
            "retried": 0,
            "started": 1,
            "window_seconds": window,
            "throughput_per_second": round(1 / window, 3),
            "failure_rate": 0.0,
        }
        assert document["is_leader"] is True
        assert document["leader_id"] == document["server_id"]

        table = ok("stats", "--once")
        assert "async_noop" in table
        assert "paused (maintenance; by anonymous)" in table
        assert "1 succeeded, 0 failed" in table

        assert ok("resume", "async_noop") == "async_noop resumed\n"
        assert wait_final(client, held).state is TaskState.SUCCEEDED
        assert ok("resume", "async_noop") == "async_noop was not paused\n"

    def test_live_stats_refresh_until_ctrl_c(self, server):
        """Without --once, stats redraws in place on a terminal and exits 0 on Ctrl-C."""
        controller, terminal = pty.openpty()
        process = subprocess.Popen(
            conveyor_command("stats", "--interval", "0.2"),
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=subprocess.PIPE,
            env=process_env(),
        )
        os.close(terminal)
        seen = bytearray()

        def redrawn() -> bool:
            while select.select([controller], [], [], 0)[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen.extend(chunk)
            return seen.count(b"answered by") >= 3

        try:
            wait_for(redrawn, what="three frames of the live view")
            process.send_signal(signal.SIGINT)
            assert process.wait(30) == 0, process.stderr.read() if process.stderr else ""
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(30)
            if process.stderr is not None:
                process.stderr.close()
            os.close(controller)
        assert b"no queued or running tasks" in seen


class TestReasonsAndActors:
    # "café outage" typed on a Latin-1 terminal: Python hands the byte 0xe9 to the program
    # as a lone surrogate (surrogateescape), which protobuf refused with a traceback.
    LATIN1_REASON = os.fsdecode(b"caf\xe9 outage")

    def test_a_reason_that_is_not_utf8_is_a_usage_error(self, client):
        queued = enqueue(client, "reason.not.text")
        cancelled = enqueue(client, "reason.not.text.cancelled")
        client.cancel_task(cancelled)
        by_id, pause, by_filter = run_all(
            ("tasks", "cancel", queued, "--reason", self.LATIN1_REASON),
            ("pause", "reason.not.text", "--reason", self.LATIN1_REASON),
            # Refused before the count and its confirmation, not after.
            ("tasks", "retry", "--type", "reason.not.text.cancelled", "--yes",
             "--reason", self.LATIN1_REASON),
        )  # fmt: skip
        for result in (by_id, pause, by_filter):
            assert result.returncode == 2, result.stderr
            assert result.stdout == ""
            assert "Invalid value for '--reason': '\\udce9' is not a character" in result.stderr
            assert "Traceback" not in result.stderr
        assert states(client, [queued, cancelled]) == [TaskState.QUEUED, TaskState.CANCELLED]
        assert client.resume_type("reason.not.text") is False  # it was never paused

    def test_the_clients_refuse_a_reason_that_is_not_text(self, client):
        task_id = enqueue(client, "reason.not.text.client")
        for call in (
            lambda: client.cancel_tasks([task_id], reason=self.LATIN1_REASON),
            lambda: client.retry_tasks(type="reason.not.text.client", reason=self.LATIN1_REASON),
            lambda: client.pause_type("reason.not.text.client", reason=self.LATIN1_REASON),
            lambda: client.cancel_tasks([task_id], reason=None),
        ):
            with pytest.raises(InvalidTask, match="reason"):
                call()
        assert states(client, [task_id]) == [TaskState.QUEUED]

    def test_show_and_status_name_who_acted(self, client):
        """docs/security.md ("Audit: who did what"): both timelines have a `by` column."""
        task_id = enqueue(client, "actor.shown")
        client.cancel_tasks([task_id], reason="duplicate order")
        for args in (("tasks", "show", task_id), ("status", task_id, "--history")):
            result = subprocess.run(
                conveyor_command(*args),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env={**process_env(), "COLUMNS": "250"},
                timeout=60,
                check=False,
            )
            out = succeeded(result)
            cancel_row = next(
                line for line in out.splitlines() if "duplicate order" in line and "│" in line
            )
            assert "anonymous" in cancel_row, out  # the actor, with authentication off
