"""Authentication and roles on a real server: tokens, what each role may call, worker binding.

Each test starts a server with a tokens file written by `conveyor.auth.new_token` (exactly
what `conveyor token create` writes), and calls it through the real clients, a real
`Worker`, or raw gRPC stubs when the point is to send what the library never would (another
worker's id or lease).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import wait_final, wait_for
from long_polls import claims
from work_streams import RawStream

from conveyor import AsyncClient, Client, Task, TaskState, Worker
from conveyor.auth import Role, TokenEntry, new_token
from conveyor.errors import ConfigError, PermissionDenied, Unauthenticated
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server.config import ServerConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from conftest import ServerThread


class Tokens:
    """A tokens file under test: add and remove tokens, as an operator would.

    Once a server reads the file (`server` set), each change waits until that server has
    picked it up, which happens within the server's tokens_check_interval.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[TokenEntry] = []
        self.path.write_text("")
        self.server: ServerThread | None = None

    def add(self, name: str, role: Role, **options: Any) -> str:
        token, entry = new_token(name, role, **options)
        self.entries.append(entry)
        self._write()
        self._wait_until_read(entry.token_id, present=True)
        return token

    def remove(self, token: str) -> None:
        token_id = token.split("_")[1]
        self.entries = [entry for entry in self.entries if entry.token_id != token_id]
        self._write()
        self._wait_until_read(token_id, present=False)

    def _wait_until_read(self, token_id: str, *, present: bool) -> None:
        if self.server is None or self.server.server is None:
            return
        tokens = self.server.server.gate.tokens
        assert tokens is not None
        wait_for(
            lambda: (tokens.current().entry(token_id) is not None) == present,
            what=f"the server to {'accept' if present else 'drop'} token {token_id}",
        )

    def _write(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("\n".join(entry.as_toml() for entry in self.entries))
        temporary.replace(self.path)


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return Tokens(tmp_path / "tokens.toml")


@pytest.fixture
def secured(start_server: Callable[..., ServerThread], tokens: Tokens) -> ServerThread:
    """A server that requires tokens (its tokens file is `tokens`)."""
    tokens.add("bootstrap-admin", Role.ADMIN)
    tokens.server = start_server(
        tokens_file=tokens.path, tokens_check_interval=timedelta(milliseconds=20)
    )
    return tokens.server


@pytest.fixture
def stubs(secured: ServerThread) -> Iterator[tuple[Any, Any]]:
    """Raw WorkerService and TaskService stubs on the secured server."""
    channel = grpc.insecure_channel(secured.address)
    yield pb_grpc.WorkerServiceStub(channel), pb_grpc.TaskServiceStub(channel)
    channel.close()


def spec(task_id: str) -> pb.TaskSpec:
    return pb.TaskSpec(id=task_id, type="t", payload=b"p", timeout=Duration(seconds=60))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def refused_code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()  # type: ignore[no-any-return]


class TestAuthentication:
    def test_calls_without_a_valid_token_are_unauthenticated(
        self, secured: ServerThread, tokens: Tokens
    ) -> None:
        """No token, a malformed one, a forged one and an expired one: all UNAUTHENTICATED."""
        expired = tokens.add("old", Role.PRODUCER, expires_at=datetime.now(UTC) - timedelta(1))
        forged = tokens.add("real", Role.PRODUCER)[:-4] + "AAAA"
        task = Task(type="t", payload=b"x")
        for token, message in (
            (None, "no token"),
            ("not-a-token", "not valid"),
            (forged, "not valid"),
            (expired, "expired"),
        ):
            with (
                Client(secured.address, token=token) as client,
                pytest.raises(Unauthenticated) as caught,
            ):
                client.enqueue_task(task)
            assert message in caught.value.message
        assert secured.server is not None
        refusals = secured.server.metrics.auth_refusals.labels("unauthenticated")._value.get()
        assert refusals >= 4

    async def test_a_client_without_a_token_is_told_where_to_give_one(
        self, secured: ServerThread
    ) -> None:
        """The server's "no token: send 'authorization: Bearer <token>'" is for raw gRPC
        callers; a client that sent none names the variables it reads a token from. On
        the enqueue stream and on a call, from both clients."""
        expected = (
            "no token: the server requires one; set CONVEYOR_TOKEN to the token, or "
            "CONVEYOR_TOKEN_FILE to a file that holds it (or pass token=... in code)"
        )
        task_id = str(uuid.uuid4())
        with Client(secured.address) as client:
            with pytest.raises(Unauthenticated) as caught:
                client.enqueue_task(Task(type="t"))
            assert caught.value.message == expected
            with pytest.raises(Unauthenticated) as caught:
                client.get_task_status(task_id)
            assert caught.value.message == expected
        async with AsyncClient(secured.address) as async_client:
            with pytest.raises(Unauthenticated) as caught:
                await async_client.enqueue_task(Task(type="t"))
            assert caught.value.message == expected
            with pytest.raises(Unauthenticated) as caught:
                await async_client.get_task_status(task_id)
            assert caught.value.message == expected

    def test_a_token_added_to_the_file_works_and_a_removed_one_stops_without_restart(
        self, secured: ServerThread, tokens: Tokens
    ) -> None:
        """Rotation: two tokens of one name work side by side; removing the old ends it."""
        old = tokens.add("billing", Role.PRODUCER)
        with Client(secured.address, token=old) as old_client:
            assert _accepted(old_client)
            new = tokens.add("billing", Role.PRODUCER)
            with Client(secured.address, token=new) as new_client:
                assert _accepted(new_client)
                assert _accepted(old_client)
                tokens.remove(old)
                assert not _accepted(old_client)
                assert _accepted(new_client)

    def test_a_broken_tokens_file_keeps_the_previous_tokens_valid(
        self, secured: ServerThread, tokens: Tokens
    ) -> None:
        """A typo in the file must not lock every client out."""
        producer = tokens.add("billing", Role.PRODUCER)
        assert secured.server is not None
        file = secured.server.gate.tokens
        assert file is not None
        with Client(secured.address, token=producer) as client:
            assert _accepted(client)
            tokens.path.write_text("[[token]\nthis is not toml")
            wait_for(lambda: file.current() and file.last_error, what="the broken file to be read")
            assert "not valid TOML" in str(file.last_error)
            assert _accepted(client)
            tokens.remove(producer)  # a valid file again: in force at once
            assert file.last_error is None
            assert not _accepted(client)


def _accepted(client: Client) -> bool:
    try:
        client.enqueue_task(Task(type="t", payload=b""))
    except Unauthenticated:
        return False
    return True


class TestRoles:
    def test_each_role_gets_exactly_its_permissions(
        self, secured: ServerThread, tokens: Tokens
    ) -> None:
        """producer: enqueue/status/cancel; viewer: read; admin: all; others: PERMISSION_DENIED."""
        producer = tokens.add("app", Role.PRODUCER)
        viewer = tokens.add("grafana", Role.VIEWER)
        worker = tokens.add("fleet", Role.WORKER)
        admin = tokens.add("ops", Role.ADMIN)
        with Client(secured.address, token=producer) as client:
            task_id = client.enqueue_task(Task(type="t", payload=b"x"))
            assert client.get_task_status(task_id).state is TaskState.QUEUED
            with pytest.raises(PermissionDenied, match="read_cluster"):
                client.list_tasks()
            with pytest.raises(PermissionDenied, match="operate"):
                client.retry_tasks([task_id])
            with pytest.raises(PermissionDenied):
                client.pause_type("t")
        with Client(secured.address, token=viewer) as client:
            assert client.get_task_status(task_id).state is TaskState.QUEUED
            assert [task.id for task in client.list_tasks().tasks] == [task_id]
            assert client.get_status().server_id
            with pytest.raises(PermissionDenied, match="enqueue"):
                client.enqueue_task(Task(type="t", payload=b""))
            with pytest.raises(PermissionDenied):
                client.cancel_task(task_id)
        with Client(secured.address, token=worker) as client:
            with pytest.raises(PermissionDenied):
                client.enqueue_task(Task(type="t", payload=b""))
            with pytest.raises(PermissionDenied):
                client.get_task_status(task_id)
        with Client(secured.address, token=producer) as client:
            client.cancel_task(task_id)
        with Client(secured.address, token=admin) as client:
            assert client.pause_type("t")
            assert client.resume_type("t")
            assert client.get_task_status(task_id).state is TaskState.CANCELLED
        assert secured.server is not None
        denied = secured.server.metrics.auth_refusals.labels("permission_denied")._value.get()
        assert denied >= 7

    async def test_a_refused_enqueue_names_enqueue_tasks_not_the_client_s_stream(
        self, secured: ServerThread, tokens: Tokens
    ) -> None:
        """A viewer's enqueue was refused on the enqueue stream the client opens for it:
        "EnqueueStream needs the enqueue permission ...", a call the user never made. The
        refusal names EnqueueTasks, from both clients, and again on a second try."""
        viewer = tokens.add("grafana", Role.VIEWER)
        expected = (
            "EnqueueTasks needs the enqueue permission, which the viewer role of 'grafana' "
            "does not have"
        )
        with Client(secured.address, token=viewer) as client:
            for _ in range(2):
                with pytest.raises(PermissionDenied) as caught:
                    client.enqueue_task(Task(type="t"))
                assert caught.value.message == expected
        async with AsyncClient(secured.address, token=viewer) as async_client:
            for _ in range(2):
                with pytest.raises(PermissionDenied) as caught:
                    await async_client.enqueue_task(Task(type="t"))
                assert caught.value.message == expected

    def test_a_worker_with_a_worker_token_runs_tasks(
        self, secured: ServerThread, tokens: Tokens
    ) -> None:
        """End to end with credentials on both sides: producer enqueues, worker runs."""
        worker = Worker(secured.address, token=tokens.add("fleet", Role.WORKER), concurrency=2)
        worker.register_handler("echo", lambda _ctx, payload: payload[::-1])
        worker.start()
        try:
            with Client(secured.address, token=tokens.add("app", Role.PRODUCER)) as client:
                task_id = client.enqueue_task(Task(type="echo", payload=b"abc"))
                status = wait_final(client, task_id)
        finally:
            worker.stop()
        assert status.state is TaskState.SUCCEEDED
        assert status.result == b"cba"

    def test_a_worker_cannot_start_with_the_wrong_role_or_types(
        self, secured: ServerThread, tokens: Tokens
    ) -> None:
        """A producer token, or a worker token limited to other types, fails start clearly."""
        for token, message in (
            (tokens.add("app", Role.PRODUCER), "work permission"),
            (
                tokens.add("mailers", Role.WORKER, task_types=["send_email"]),
                "may not work on task types resize_image",
            ),
        ):
            worker = Worker(secured.address, token=token)
            worker.register_handler("resize_image", lambda _ctx, payload: payload)
            with pytest.raises(PermissionDenied, match=message):
                worker.start()
            worker.stop()

    def test_a_worker_without_a_token_is_told_where_to_give_one(
        self, secured: ServerThread
    ) -> None:
        """As a client is (`conveyor worker` prints it): not the raw gRPC wording."""
        worker = Worker(secured.address)
        worker.register_handler("resize_image", lambda _ctx, payload: payload)
        with pytest.raises(Unauthenticated) as caught:
            worker.start()
        worker.stop()
        assert caught.value.message == (
            "no token: the server requires one; set CONVEYOR_TOKEN to the token, or "
            "CONVEYOR_TOKEN_FILE to a file that holds it (or pass token=... in code)"
        )


class TestWorkerBinding:
    """A worker id belongs to the principal that registered it; leases to their worker."""

    def register(self, stub: Any, token: str, worker_id: str) -> None:
        stub.RegisterWorker(
            pb.RegisterWorkerRequest(worker_id=worker_id, task_types=["t"], concurrency=1),
            metadata=bearer(token),
            timeout=10,
        )

    def test_another_principal_cannot_use_a_worker_id_or_report_its_lease(
        self, secured: ServerThread, tokens: Tokens, stubs: tuple[Any, Any]
    ) -> None:
        """Worker B (other credentials) can neither act as A nor report A's lease as itself."""
        workers, tasks = stubs
        token_a, token_b = tokens.add("team-a", Role.WORKER), tokens.add("team-b", Role.WORKER)
        producer = tokens.add("app", Role.PRODUCER)
        task_id = str(uuid.uuid4())
        tasks.EnqueueTasks(
            pb.EnqueueTasksRequest(tasks=[spec(task_id)]),
            metadata=bearer(producer),
            timeout=10,
        )
        self.register(workers, token_a, "worker-a")
        self.register(workers, token_b, "worker-b")
        lease = workers.LeaseTasks(
            pb.LeaseTasksRequest(worker_id="worker-a", task_types=["t"], max_tasks=1),
            metadata=bearer(token_a),
            timeout=10,
        ).leases[0]
        as_a = {"metadata": bearer(token_b), "timeout": 10}
        report = pb.ReportResultRequest(
            worker_id="worker-a",
            task_id=task_id,
            lease_id=lease.lease_id,
            outcome=pb.OUTCOME_SUCCEEDED,
        )
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert refused_code(lambda: workers.ReportResult(report, **as_a)) == denied
        assert (
            refused_code(
                lambda: workers.ReportResults(
                    pb.ReportResultsRequest(worker_id="worker-a", reports=[report]), **as_a
                )
            )
            == denied
        )
        assert (
            refused_code(
                lambda: workers.LeaseTasks(
                    pb.LeaseTasksRequest(worker_id="worker-a", task_types=["t"], max_tasks=1),
                    **as_a,
                )
            )
            == denied
        )
        heartbeat = pb.HeartbeatRequest(
            worker_id="worker-a",
            leases=[pb.LeaseRef(task_id=task_id, lease_id=lease.lease_id)],
        )
        assert refused_code(lambda: workers.Heartbeat(heartbeat, **as_a)) == denied
        assert refused_code(lambda: self.register(workers, token_b, "worker-a")) == denied
        # As itself, B's report of A's lease is fenced out by the worker id.
        own = pb.ReportResultRequest(
            worker_id="worker-b",
            task_id=task_id,
            lease_id=lease.lease_id,
            outcome=pb.OUTCOME_FAILED,
            error="forged",
        )
        with pytest.raises(grpc.RpcError) as caught:
            workers.ReportResult(own, **as_a)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "lease lost" in (caught.value.details() or "")
        stopped = workers.Heartbeat(
            pb.HeartbeatRequest(
                worker_id="worker-b",
                leases=[pb.LeaseRef(task_id=task_id, lease_id=lease.lease_id)],
            ),
            **as_a,
        ).stop
        assert [entry.task_id for entry in stopped] == [task_id]
        # A itself still holds the lease and settles it.
        answer = workers.ReportResult(report, metadata=bearer(token_a), timeout=10)
        assert answer.state == pb.TASK_STATE_SUCCEEDED
        # Refusals past the gate (another worker's id) are counted like role refusals.
        assert secured.server is not None
        denied = secured.server.metrics.auth_refusals.labels("permission_denied")._value.get()
        assert denied >= 5  # report, reports, lease, heartbeat, register

    def test_a_work_stream_is_its_worker_s_alone(
        self, secured: ServerThread, tokens: Tokens, stubs: tuple[Any, Any]
    ) -> None:
        """Work, like LeaseTasks: only the registering principal, only worker tokens, only
        the types a limited token names."""
        workers, _ = stubs
        token_a, token_b = tokens.add("team-a", Role.WORKER), tokens.add("team-b", Role.WORKER)
        producer = tokens.add("app", Role.PRODUCER)
        limited = tokens.add("team-a", Role.WORKER, task_types=["t"])
        self.register(workers, token_a, "worker-s")

        def first_answers(token: str, task_types: list[str]) -> list[pb.WorkResponse]:
            # One message then a half-close: an accepted stream answers once and ends OK.
            request = pb.WorkRequest(worker_id="worker-s", task_types=task_types, grant=1)
            return list(workers.Work(iter([request]), metadata=bearer(token), timeout=10))

        assert first_answers(token_a, ["t"])[0] == pb.WorkResponse()
        assert first_answers(limited, ["t"])[0] == pb.WorkResponse()
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert refused_code(lambda: first_answers(token_b, ["t"])) == denied
        assert refused_code(lambda: first_answers(producer, ["t"])) == denied
        assert refused_code(lambda: first_answers(limited, ["t", "other"])) == denied

    def test_an_open_work_stream_ends_when_its_token_is_revoked(
        self, secured: ServerThread, tokens: Tokens, stubs: tuple[Any, Any]
    ) -> None:
        """A stream is admitted again every second: revoking the token ends it, as it ends
        the worker's unary calls."""
        workers, _ = stubs
        token = tokens.add("fleet", Role.WORKER)
        self.register(workers, token, "worker-v")
        stream = RawStream(workers, metadata=bearer(token))
        try:
            stream.send(worker_id="worker-v", task_types=["t"], grant=1)
            assert stream.take() == pb.WorkResponse()
            assert stream.nothing_within(1.5)  # still admitted, still open
            tokens.remove(token)
            ended = stream.take(timeout=10)
            assert isinstance(ended, grpc.RpcError), ended
            assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            stream.close()

    def test_a_long_poll_whose_token_is_revoked_meanwhile_gets_no_task(
        self, secured: ServerThread, tokens: Tokens, stubs: tuple[Any, Any]
    ) -> None:
        """A poll waits up to 30 s after its admission: a task that arrives after the token
        was revoked must not reach it, and goes back to the queue for another worker."""
        workers, tasks = stubs
        token, producer = tokens.add("fleet", Role.WORKER), tokens.add("app", Role.PRODUCER)
        admin = tokens.add("ops", Role.ADMIN)
        self.register(workers, token, "worker-revoked")
        poll = workers.LeaseTasks.future(
            pb.LeaseTasksRequest(
                worker_id="worker-revoked",
                task_types=["t"],
                max_tasks=1,
                wait=Duration(seconds=20),
            ),
            metadata=bearer(token),
            timeout=30,
        )
        try:
            wait_for(
                lambda: claims(secured.http_url, admin).get("empty", 0) >= 1,
                what="the long poll to be waiting",
            )
            tokens.remove(token)
            task_id = str(uuid.uuid4())
            tasks.EnqueueTasks(
                pb.EnqueueTasksRequest(tasks=[spec(task_id)]), metadata=bearer(producer), timeout=10
            )
            with pytest.raises(grpc.RpcError) as refused:
                poll.result(timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            poll.cancel()
        with Client(secured.address, token=admin) as client:
            status = wait_for(
                lambda: (
                    (s := client.get_task_status(task_id, history=True)).state is TaskState.QUEUED
                    and s.history[-1].event == "released"
                    and s
                ),
                what="the lease to go back to the queue",
            )
        assert status.attempts == 0  # the attempt went back with the lease
        assert "token was refused" in (status.history[-1].detail or "")

    def test_a_worker_whose_row_was_deleted_is_told_to_register_again(
        self, secured: ServerThread, tokens: Tokens, stubs: tuple[Any, Any], db: Any
    ) -> None:
        """Deleted after a long silence (worker retention), a worker id has no principal:
        its heartbeat is answered `unregistered`, not refused, so the worker registers
        again instead of being refused until it restarts."""
        workers, _ = stubs
        token = tokens.add("fleet", Role.WORKER)
        self.register(workers, token, "worker-gone")
        db.execute("DELETE FROM conveyor_workers WHERE id = 'worker-gone'")
        beat = workers.Heartbeat(
            pb.HeartbeatRequest(worker_id="worker-gone"), metadata=bearer(token), timeout=10
        )
        assert beat.unregistered
        self.register(workers, token, "worker-gone")
        beat = workers.Heartbeat(
            pb.HeartbeatRequest(worker_id="worker-gone"), metadata=bearer(token), timeout=10
        )
        assert not beat.unregistered

    def test_an_id_taken_over_after_its_row_was_deleted_is_refused_to_its_old_owner(
        self,
        secured: ServerThread,
        tokens: Tokens,
        stubs: tuple[Any, Any],
        start_server: Callable[..., ServerThread],
        db: Any,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A server remembers each worker's owner; once the leader deletes a gone worker's
        row, another principal may register the id elsewhere, and the server that
        remembered the old owner must not let it act as that worker for ever."""
        monkeypatch.setattr("conveyor.server.worker_service.OWNER_MEMORY_SECONDS", 0.5)
        other = start_server(
            tokens_file=tokens.path, tokens_check_interval=timedelta(milliseconds=20)
        )
        team_a, team_b = tokens.add("team-a", Role.WORKER), tokens.add("team-b", Role.WORKER)
        channel = grpc.insecure_channel(other.address)
        try:
            workers_b = pb_grpc.WorkerServiceStub(channel)
            workers_a, _ = stubs
            self.register(workers_a, team_a, "w-fixed")  # the first server remembers team-a
            db.execute("DELETE FROM conveyor_workers WHERE id = 'w-fixed'")  # as the leader would
            self.register(workers_b, team_b, "w-fixed")  # taken over on the other server

            def refused_to_team_a() -> bool:
                try:
                    workers_a.Heartbeat(
                        pb.HeartbeatRequest(worker_id="w-fixed"),
                        metadata=bearer(team_a),
                        timeout=10,
                    )
                except grpc.RpcError as exc:
                    return exc.code() == grpc.StatusCode.PERMISSION_DENIED
                return False

            wait_for(refused_to_team_a, timeout=10, what="the first server to forget team-a")
        finally:
            channel.close()
        assert db.fetchval("SELECT principal FROM conveyor_workers WHERE id = 'w-fixed'") == (
            "team-b"
        )

    def test_two_tokens_of_one_principal_share_its_workers(
        self, secured: ServerThread, tokens: Tokens, stubs: tuple[Any, Any]
    ) -> None:
        """Binding is to the principal, not to one token: rotation keeps workers working."""
        workers, _ = stubs
        old, new = tokens.add("fleet", Role.WORKER), tokens.add("fleet", Role.WORKER)
        self.register(workers, old, "worker-r")
        answer = workers.LeaseTasks(
            pb.LeaseTasksRequest(worker_id="worker-r", task_types=["t"], max_tasks=1),
            metadata=bearer(new),
            timeout=10,
        )
        assert list(answer.leases) == []

    def test_unregistered_worker_ids_are_refused(
        self, secured: ServerThread, tokens: Tokens, stubs: tuple[Any, Any]
    ) -> None:
        """With authentication on, a worker must register before it leases."""
        workers, _ = stubs
        token = tokens.add("fleet", Role.WORKER)
        with pytest.raises(grpc.RpcError) as caught:
            workers.LeaseTasks(
                pb.LeaseTasksRequest(worker_id="never-registered", task_types=["t"], max_tasks=1),
                metadata=bearer(token),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not registered" in (caught.value.details() or "")


class TestFencingByWorkerWithoutAuthentication:
    def test_a_lease_reported_under_another_worker_id_is_refused(
        self, server: ServerThread
    ) -> None:
        """Even with authentication off, a report must come from the worker holding the lease."""
        channel = grpc.insecure_channel(server.address)
        workers, tasks = pb_grpc.WorkerServiceStub(channel), pb_grpc.TaskServiceStub(channel)
        task_id = str(uuid.uuid4())
        tasks.EnqueueTasks(
            pb.EnqueueTasksRequest(tasks=[spec(task_id)]),
            timeout=10,
        )
        lease = workers.LeaseTasks(
            pb.LeaseTasksRequest(worker_id="holder", task_types=["t"], max_tasks=1), timeout=10
        ).leases[0]
        for outcome in (pb.OUTCOME_SUCCEEDED, pb.OUTCOME_FAILED, pb.OUTCOME_RELEASED):
            report = pb.ReportResultRequest(
                worker_id="intruder", task_id=task_id, lease_id=lease.lease_id, outcome=outcome
            )
            with pytest.raises(grpc.RpcError) as caught:
                workers.ReportResult(report, timeout=10)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with Client(server.address) as client:
            assert client.get_task_status(task_id).state is TaskState.RUNNING
        channel.close()


class TestExposure:
    def test_a_non_loopback_server_needs_tls_and_tokens_or_insecure(
        self, database_url: str, tmp_path: Path
    ) -> None:
        """The refusal names what is missing; --insecure (or both) lets it start."""
        with pytest.raises(ConfigError) as caught:
            ServerConfig(database_url=database_url, grpc_listen="0.0.0.0:50051")
        assert caught.value.message.startswith(
            "gRPC listens on 0.0.0.0:50051, which is not a loopback address, and the server "
            "has no TLS or authentication. "
        )
        assert "--insecure" in caught.value.message
        with pytest.raises(ConfigError, match=r"and the server has no TLS\. "):
            ServerConfig(
                database_url=database_url,
                http_listen="10.1.2.3:8080",
                tokens_file=tmp_path / "tokens.toml",
            )
        ServerConfig(database_url=database_url, grpc_listen="0.0.0.0:1", insecure=True)
        ServerConfig(
            database_url=database_url,
            grpc_listen="[::]:1",
            http_listen=None,
            tokens_file=tmp_path / "tokens.toml",
            tls_cert_file=tmp_path / "cert.pem",
            tls_key_file=tmp_path / "key.pem",
        )


class TestTokensFromTheEnvironment:
    def test_tokens_given_as_text_authenticate_and_exclude_a_file(
        self, start_server: Callable[..., ServerThread], tmp_path: Path
    ) -> None:
        """CONVEYOR_TOKENS (ServerConfig.tokens_toml): same format, fixed for the process."""
        token, entry = new_token("app", Role.PRODUCER)
        server = start_server(tokens_toml=entry.as_toml())
        with Client(server.address, token=token) as client:
            assert client.enqueue_task(Task(type="t", payload=b""))
        with Client(server.address) as client, pytest.raises(Unauthenticated):
            client.enqueue_task(Task(type="t", payload=b""))
        with pytest.raises(ConfigError, match="not both"):
            ServerConfig(
                database_url="postgresql://x/y",
                tokens_toml=entry.as_toml(),
                tokens_file=tmp_path / "tokens.toml",
            )


class TestIdsFromBeforeAuthentication:
    def test_an_id_registered_without_tokens_can_be_taken_once_tokens_are_on(
        self, start_server: Callable[..., ServerThread], tmp_path: Path
    ) -> None:
        """A fixed worker id survives turning authentication on; then it is bound."""
        open_server = start_server()
        team_a, entry_a = new_token("team-a", Role.WORKER)
        team_b, entry_b = new_token("team-b", Role.WORKER)
        tokens = tmp_path / "tokens.toml"
        tokens.write_text(entry_a.as_toml() + "\n" + entry_b.as_toml())
        secured = start_server(tokens_file=tokens)
        request = pb.RegisterWorkerRequest(worker_id="mailer-0", task_types=["t"], concurrency=1)
        with grpc.insecure_channel(open_server.address) as channel:
            old = pb_grpc.WorkerServiceStub(channel)
            old.RegisterWorker(request, timeout=10)
        with grpc.insecure_channel(secured.address) as channel:
            workers = pb_grpc.WorkerServiceStub(channel)
            # While the old worker lives, its id is not handed to whoever asks first.
            assert (
                refused_code(
                    lambda: workers.RegisterWorker(request, metadata=bearer(team_a), timeout=10)
                )
                == grpc.StatusCode.PERMISSION_DENIED
            )
            # It stops (the process restarts with a token): the id is free to take.
            with grpc.insecure_channel(open_server.address) as old_channel:
                pb_grpc.WorkerServiceStub(old_channel).UnregisterWorker(
                    pb.UnregisterWorkerRequest(worker_id="mailer-0"), timeout=10
                )
            workers.RegisterWorker(request, metadata=bearer(team_a), timeout=10)
            assert (
                refused_code(
                    lambda: workers.RegisterWorker(request, metadata=bearer(team_b), timeout=10)
                )
                == grpc.StatusCode.PERMISSION_DENIED
            )
            lease = pb.LeaseTasksRequest(worker_id="mailer-0", task_types=["t"], max_tasks=1)
            assert not workers.LeaseTasks(lease, metadata=bearer(team_a), timeout=10).leases
