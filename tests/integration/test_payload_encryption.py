"""Payload confidentiality end to end: a client and a worker with a codec, a real server.

What the server, the database and the dashboard hold must be sealed; what the producer and
the handler see must be the original; a worker without the key must fail the attempt
saying which key it lacks; and keys must rotate without losing a task.
"""

from __future__ import annotations

import base64
import re
import threading
import urllib.request
from datetime import timedelta
from typing import TYPE_CHECKING

from helpers import run_cli, running, wait_final, wait_for

from conveyor import AesGcmCodec, Client, Task, TaskContext, TaskState, Worker
from conveyor.codec import is_sealed, is_sealed_text

if TYPE_CHECKING:
    from conftest import ServerThread
    from helpers import Db

SECRET = b"ssn=078-05-1120"
OLD_KEY = ("k1", b"\x11" * 32)
NEW_KEY = ("k2", b"\x22" * 32)


def run_worker(server: ServerThread, codec: AesGcmCodec | None) -> Worker:
    worker = Worker(server.address, codec=codec)

    def echo(_ctx: object, payload: bytes) -> bytes:
        assert payload == SECRET  # the handler sees the original
        return b"result:" + payload

    def leak(_ctx: object, payload: bytes) -> bytes:
        raise ValueError(f"could not process {payload.decode()}")

    worker.register_handler("echo", echo)
    worker.register_handler("leak", leak)
    worker.start()
    return worker


class TestPayloadEncryption:
    def test_payload_result_and_error_are_sealed_everywhere_but_the_ends(
        self, server: ServerThread, db: Db
    ) -> None:
        codec = AesGcmCodec([NEW_KEY])
        worker = run_worker(server, codec)
        try:
            with Client(server.address, codec=codec) as client:
                ok = client.enqueue_task(Task(type="echo", payload=SECRET))
                failing = client.enqueue_task(Task(type="leak", payload=SECRET, max_retries=0))
                ok_status = wait_final(client, ok)
                failed_status = wait_final(client, failing)
        finally:
            worker.stop()
        # The ends see the originals.
        assert ok_status.state is TaskState.SUCCEEDED  # type: ignore[attr-defined]
        assert ok_status.result == b"result:" + SECRET  # type: ignore[attr-defined]
        assert failed_status.state is TaskState.FAILED  # type: ignore[attr-defined]
        assert failed_status.last_error == (  # type: ignore[attr-defined]
            f"ValueError: could not process {SECRET.decode()}"
        )
        # The database holds only sealed data.
        for task_id in (ok, failing):
            row = db.task(task_id)
            assert is_sealed(bytes(row["payload"]))
            assert SECRET not in bytes(row["payload"])
        assert is_sealed(bytes(db.task(ok)["result"]))
        assert SECRET not in bytes(db.task(ok)["result"])
        assert is_sealed_text(db.task(failing)["last_error"])
        details = [event["detail"] or "" for event in db.events(failing)]
        assert any(is_sealed_text(detail) for detail in details)
        assert not any(SECRET.decode() in detail for detail in details)
        # The dashboard says "encrypted" and shows nothing of the secret.
        with urllib.request.urlopen(f"{server.http_url}/ui/tasks/{failing}") as page:  # noqa: S310
            html = page.read().decode()
        assert "encrypted by the producer (key k2)" in html
        assert "encrypted by the worker" in html
        assert SECRET.decode() not in html

    def test_progress_reports_are_sealed_too(self, server: ServerThread, db: Db) -> None:
        """ctx.heartbeat(details) is stored on the task: sealed, and opened by the client."""
        codec = AesGcmCodec([NEW_KEY])
        worker = Worker(server.address, codec=codec)
        release = threading.Event()

        def report_then_wait(ctx: TaskContext, payload: bytes) -> bytes:
            ctx.heartbeat(f"processing {payload.decode()}")
            release.wait(20)
            return b""

        worker.register_handler("slow", report_then_wait)
        worker.start()
        try:
            with Client(server.address, codec=codec) as client:
                task_id = client.enqueue_task(Task(type="slow", payload=SECRET))
                stored = wait_for(
                    lambda: db.task(task_id)["progress"], what="the progress to be stored"
                )
                assert is_sealed_text(stored)
                assert SECRET.decode() not in stored
                assert client.get_task_status(task_id).progress == f"processing {SECRET.decode()}"
                release.set()
                assert wait_final(client, task_id).state is TaskState.SUCCEEDED  # type: ignore[attr-defined]
        finally:
            release.set()
            worker.stop()

    def test_a_worker_without_the_key_fails_the_attempt_and_names_the_key(
        self, server: ServerThread
    ) -> None:
        worker = run_worker(server, AesGcmCodec([OLD_KEY]))
        try:
            with Client(server.address, codec=AesGcmCodec([NEW_KEY])) as client:
                task_id = client.enqueue_task(
                    Task(type="echo", payload=SECRET, max_retries=0, timeout=timedelta(seconds=5))
                )
                status = wait_final(client, task_id)
        finally:
            worker.stop()
        assert status.state is TaskState.FAILED  # type: ignore[attr-defined]
        assert "sealed with key 'k2', which this codec does not have" in (
            status.last_error or ""  # type: ignore[attr-defined]
        )

    def test_a_worker_without_any_codec_fails_the_attempt_and_names_the_key(
        self, server: ServerThread, monkeypatch
    ) -> None:
        """One pod deployed without the keys once ran handlers on the ciphertext and
        reported their garbage as results, unsealed."""
        monkeypatch.delenv("CONVEYOR_PAYLOAD_KEYS", raising=False)
        worker = run_worker(server, None)
        try:
            with Client(server.address, codec=AesGcmCodec([NEW_KEY])) as client:
                task_id = client.enqueue_task(Task(type="echo", payload=SECRET, max_retries=0))
                status = wait_final(client, task_id)
        finally:
            worker.stop()
        assert status.state is TaskState.FAILED  # type: ignore[attr-defined]
        assert status.last_error == (  # type: ignore[attr-defined]
            f"SealError: the payload of task {task_id} was sealed with key 'k2', which this "
            "worker does not have (it has no payload keys: set CONVEYOR_PAYLOAD_KEYS or give "
            "the Worker a codec)"
        )
        assert status.result is None  # type: ignore[attr-defined]

    def test_keys_rotate_without_losing_tasks(self, server: ServerThread) -> None:
        """Sealed under k1, enqueued before the rotation, run by a worker holding [k2, k1]."""
        with Client(server.address, codec=AesGcmCodec([OLD_KEY])) as old_client:
            before = old_client.enqueue_task(Task(type="echo", payload=SECRET))
        rotated = AesGcmCodec([NEW_KEY, OLD_KEY])
        worker = run_worker(server, rotated)
        try:
            with Client(server.address, codec=rotated) as client:
                after = client.enqueue_task(Task(type="echo", payload=SECRET))
                statuses = [wait_final(client, task_id) for task_id in (before, after)]
        finally:
            worker.stop()
        assert [s.state for s in statuses] == [TaskState.SUCCEEDED] * 2  # type: ignore[attr-defined]
        assert [s.result for s in statuses] == [b"result:" + SECRET] * 2  # type: ignore[attr-defined]

    def test_plain_payloads_from_producers_without_a_codec_still_run(
        self, server: ServerThread, db: Db
    ) -> None:
        worker = run_worker(server, AesGcmCodec([NEW_KEY]))
        try:
            with Client(server.address) as plain:
                task_id = plain.enqueue_task(Task(type="echo", payload=SECRET))
                status = wait_final(plain, task_id)
        finally:
            worker.stop()
        assert status.state is TaskState.SUCCEEDED  # type: ignore[attr-defined]
        # The worker sealed the result; the plain client shows it sealed, not garbled.
        assert is_sealed(status.result or b"")  # type: ignore[attr-defined]
        assert bytes(db.task(task_id)["payload"]) == SECRET


class BulkyCodec:
    """AesGcmCodec's seal and 7,000 bytes more (a wrapped key, say): even an empty message
    seals to more text than the server keeps, which `seal_text` cannot cut to fit."""

    OVERHEAD = b"k" * 7000

    def __init__(self) -> None:
        self.inner = AesGcmCodec([NEW_KEY])

    def seal(self, data: bytes, *, field: str, task_id: str) -> bytes:
        return self.inner.seal(data, field=field, task_id=task_id) + self.OVERHEAD

    def open(self, data: bytes, *, field: str, task_id: str) -> bytes:
        return self.inner.open(data.removesuffix(self.OVERHEAD), field=field, task_id=task_id)


TOO_LONG = re.compile(
    r"sealed (error|progress) of \d{4,} characters was too long to keep \(limit 8000\); "
    r"its text is lost"
)


def test_a_sealed_text_too_long_to_keep_is_replaced_not_cut(server: ServerThread, db: Db) -> None:
    """A cut seal cannot be opened: what was left of it was stored as if it were sealed, and
    every reader failed on it. The server stores a plain note instead, for errors and
    progress alike, and still applies the report: the failure is retried, then final."""
    codec = BulkyCodec()
    worker = Worker(server.address, codec=codec)
    progressed = threading.Event()

    def report_then_fail(ctx: TaskContext, _payload: bytes) -> bytes:
        ctx.heartbeat("halfway")
        progressed.wait(20)
        raise ValueError("could not process it")

    worker.register_handler("bulky", report_then_fail)
    worker.start()
    try:
        with Client(server.address, codec=codec) as client:
            task_id = client.enqueue_task(Task(type="bulky", payload=b"x", max_retries=1))
            stored = wait_for(lambda: db.task(task_id)["progress"], what="the progress")
            assert TOO_LONG.fullmatch(stored), stored
            assert client.get_task_status(task_id).progress == stored
            progressed.set()
            status = wait_final(client, task_id)
    finally:
        progressed.set()
        worker.stop()
    assert status.state is TaskState.FAILED  # type: ignore[attr-defined]
    assert status.attempts == 2  # type: ignore[attr-defined]
    assert TOO_LONG.fullmatch(status.last_error or ""), status.last_error  # type: ignore[attr-defined]
    failures = [e for e in status.history if e.event == "failed"]  # type: ignore[attr-defined]
    assert [e.state for e in failures] == [TaskState.QUEUED, TaskState.FAILED]
    assert all(TOO_LONG.fullmatch(e.detail or "") for e in failures), failures


def test_the_cli_shows_a_task_sealed_with_a_key_it_lacks(server: ServerThread) -> None:
    """Before: with CONVEYOR_PAYLOAD_KEYS holding other keys than the task's (an old key
    retired from the set, another producer's), `status` and `tasks show` failed with
    'sealed with key k1, which this codec does not have' and showed nothing of the task."""
    worker = Worker(server.address, codec=AesGcmCodec([OLD_KEY]))
    worker.register_handler("sealed.for.others", lambda _ctx, payload: payload[::-1])
    with Client(server.address, codec=AesGcmCodec([OLD_KEY])) as producer, running(worker):
        task_id = producer.enqueue_task(Task(type="sealed.for.others", payload=SECRET))
        assert wait_final(producer, task_id).state is TaskState.SUCCEEDED
    only_new = {"CONVEYOR_PAYLOAD_KEYS": f"k2={base64.b64encode(NEW_KEY[1]).decode()}"}
    for command in (("status", task_id, "--json"), ("tasks", "show", task_id)):
        result = run_cli(*command, "--server", server.address, **only_new)
        assert result.returncode == 0, result.stderr
        assert "sealed with key k1" in result.stdout, result.stdout
        assert "succeeded" in result.stdout
    # What it says of the payload: it has no key for it, whether the variable is unset or
    # (as here) holds others; it said "set CONVEYOR_PAYLOAD_KEYS to open" though it was set.
    assert "CONVEYOR_PAYLOAD_KEYS holds no key that opens it" in result.stdout, result.stdout


def test_the_cli_shows_a_sealed_error_as_the_other_views_do(server: ServerThread) -> None:
    """Without the key, `tasks show`, `status --history` and `tasks list` printed the raw
    `cvy-sealed:v1:...` base64 of a worker's sealed error, where the same page's "why", the
    explanation and the dashboard say "(encrypted by the worker)"; with the key, opened."""
    worker = Worker(server.address, codec=AesGcmCodec([OLD_KEY]))

    def fail(_ctx: TaskContext, _payload: bytes) -> bytes:
        raise ValueError("card declined")

    worker.register_handler("sealed.error", fail)
    with Client(server.address, codec=AesGcmCodec([OLD_KEY])) as producer, running(worker):
        task_id = producer.enqueue_task(Task(type="sealed.error", max_retries=0))
        assert wait_final(producer, task_id).state is TaskState.FAILED
    with_key = {"CONVEYOR_PAYLOAD_KEYS": f"k1={base64.b64encode(OLD_KEY[1]).decode()}"}
    commands = (
        ("tasks", "show", task_id),
        ("status", task_id, "--history"),
        ("tasks", "list", "--type", "sealed.error"),
    )
    for command in commands:
        without = run_cli(*command, "--server", server.address, COLUMNS="200")
        assert without.returncode == 0, without.stderr
        assert "cvy-sealed" not in without.stdout, without.stdout
        assert "(encrypted by the worker)" in without.stdout, without.stdout
        opened = run_cli(*command, "--server", server.address, COLUMNS="200", **with_key)
        assert opened.returncode == 0, opened.stderr
        assert "ValueError: card declined" in opened.stdout, opened.stdout
