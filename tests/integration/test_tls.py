"""TLS on gRPC, against a real server: clients and workers verify it, mutual TLS verifies them.

Certificates come from a throwaway CA (trustme), written to files exactly as an operator
would hand them to `conveyor server --tls-cert/--tls-key/--tls-client-ca`.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
import trustme
from helpers import (
    assert_one_error_line,
    conveyor_command,
    process_env,
    run_cli,
    server_argv,
    wait_final,
)

from conveyor import Client, RetryPolicy, Task, TaskState, TlsConfig, Worker
from conveyor.auth import Role, new_token
from conveyor.errors import ConfigError, ServerUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from conftest import ServerThread

# Refusals are not retried for long: a wrong certificate will not become right.
QUICK = RetryPolicy(total_timeout=timedelta(seconds=1), call_timeout=timedelta(seconds=1))


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1", "conveyor.internal")
    client = ca.issue_cert("worker-17.example")
    paths = Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    other.cert_pem.write_to_path(str(paths.other_ca))
    server.private_key_pem.write_to_path(str(paths.server_key))
    paths.server_cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    client.private_key_pem.write_to_path(str(paths.client_key))
    paths.client_cert.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    return paths


def enqueue(address: str, tls: TlsConfig | bool, **options: object) -> str:
    with Client(address, tls=tls, retry=QUICK, **options) as client:  # type: ignore[arg-type]
        return client.enqueue_task(Task(type="t", payload=b"over tls"))


class TestServerTls:
    @pytest.fixture
    def tls_server(self, start_server: Callable[..., ServerThread], pki: Pki) -> ServerThread:
        return start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)

    def test_a_client_that_trusts_the_ca_connects(self, tls_server: ServerThread, pki: Pki) -> None:
        port = tls_server.address.rpartition(":")[2]
        assert enqueue(f"localhost:{port}", TlsConfig(ca_file=pki.ca))
        assert enqueue(f"127.0.0.1:{port}", TlsConfig(ca_file=pki.ca))

    def test_the_expected_name_can_differ_from_the_address(
        self, tls_server: ServerThread, pki: Pki
    ) -> None:
        """Dialling by IP or through a tunnel, the certificate's name is still checked."""
        assert enqueue(
            tls_server.address, TlsConfig(ca_file=pki.ca, server_name="conveyor.internal")
        )
        with pytest.raises(ServerUnavailable):
            enqueue(tls_server.address, TlsConfig(ca_file=pki.ca, server_name="evil.example"))

    def test_plain_text_and_an_untrusted_ca_are_refused(
        self, tls_server: ServerThread, pki: Pki
    ) -> None:
        """Refused, and told what to check: gRPC's own words ("Socket closed", "Tls
        handshake failed") name neither side's TLS setting."""
        with pytest.raises(ServerUnavailable) as plain:
            enqueue(tls_server.address, tls=False)
        with pytest.raises(ServerUnavailable) as untrusted:
            enqueue(tls_server.address, TlsConfig(ca_file=pki.other_ca))
        assert "if the server uses TLS: set CONVEYOR_TLS_CA" in plain.value.message
        assert "the TLS handshake failed" in untrusted.value.message
        assert "CONVEYOR_TLS_CA" in untrusted.value.message

    def test_the_cli_says_a_handshake_failed_in_one_line(
        self, tls_server: ServerThread, pki: Pki, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """gRPC's C core printed a line of its own per reconnection attempt (eight in 30 s)
        above the CLI's `error:` line, unless GRPC_VERBOSITY was set: the CLI set it after
        `conveyor`, and grpc with it, had been imported. Run without it here, as a shell
        would."""
        monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
        line = assert_one_error_line(
            run_cli(
                "--retry-for=2",
                "status",
                str(uuid.uuid4()),
                "--server",
                tls_server.address,
                CONVEYOR_TLS_CA=str(pki.other_ca),
            )
        )
        assert "the TLS handshake failed" in line

    def test_tls_settings_come_from_the_environment(
        self, tls_server: ServerThread, pki: Pki, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """CONVEYOR_TLS_CA is all a deployed app (or the CLI) needs."""
        monkeypatch.setenv("CONVEYOR_TLS_CA", str(pki.ca))
        with Client(tls_server.address, retry=QUICK) as client:
            assert client.enqueue_task(Task(type="t", payload=b""))

    def test_a_worker_runs_tasks_over_tls_with_a_token(
        self, start_server: Callable[..., ServerThread], pki: Pki, tmp_path: Path
    ) -> None:
        """The production set-up end to end: TLS, tokens, a worker and a producer."""
        worker_token, worker_entry = new_token("fleet", Role.WORKER)
        app_token, app_entry = new_token("app", Role.PRODUCER)
        tokens = tmp_path / "tokens.toml"
        tokens.write_text(worker_entry.as_toml() + "\n" + app_entry.as_toml())
        server = start_server(
            tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tokens_file=tokens
        )
        tls = TlsConfig(ca_file=pki.ca)
        worker = Worker(server.address, token=worker_token, tls=tls)
        worker.register_handler("t", lambda _ctx, payload: payload.upper())
        worker.start()
        try:
            with Client(server.address, token=app_token, tls=tls) as client:
                task_id = client.enqueue_task(Task(type="t", payload=b"secret"))
                status = wait_final(client, task_id)
        finally:
            worker.stop()
        assert status.state is TaskState.SUCCEEDED
        assert status.result == b"SECRET"

    def test_a_worker_that_does_not_trust_the_certificate_is_told_so(
        self, tls_server: ServerThread, pki: Pki
    ) -> None:
        """The worker's start failure carries the clients' hint: its own words were gRPC's
        alone, and "Tls handshake failed" or "Socket closed" name no setting to check.

        Refused at once, the calls open the breaker: start(timeout=1) then slept until its
        next probe and gave up after five seconds, saying only "every server's circuit
        breaker is open". It now gives up on time, with the failure that opened it."""
        for tls, hint in (
            (TlsConfig(ca_file=pki.other_ca), "the TLS handshake failed"),
            (False, "if the server uses TLS: set CONVEYOR_TLS_CA"),
        ):
            worker = Worker(tls_server.address, tls=tls)
            worker.register_handler("t", lambda _ctx, payload: payload)
            began = time.monotonic()
            with pytest.raises(ServerUnavailable) as refused:
                worker.start(timeout=1)
            took = time.monotonic() - began
            assert "accepted the worker" in refused.value.message
            assert hint in refused.value.message
            assert took < 4, f"start(timeout=1) took {took:.1f}s"


class TestMutualTls:
    def test_clients_without_a_certificate_from_the_ca_are_refused(
        self, start_server: Callable[..., ServerThread], pki: Pki
    ) -> None:
        server = start_server(
            tls_cert_file=pki.server_cert,
            tls_key_file=pki.server_key,
            tls_client_ca_file=pki.ca,
        )
        with pytest.raises(ServerUnavailable):
            enqueue(server.address, TlsConfig(ca_file=pki.ca))
        assert enqueue(
            server.address,
            TlsConfig(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key),
        )


class TestBadFiles:
    def test_a_bad_certificate_or_ca_is_a_one_line_config_error(
        self, database_url: str, pki: Pki, tmp_path: Path
    ) -> None:
        """Not gRPC's "Failed to bind to address": the file and what is wrong with it."""
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("not a certificate")
        for options, message in (
            ({"tls_cert_file": garbage, "tls_key_file": pki.server_key}, "certificate or key"),
            ({"tls_cert_file": pki.server_cert, "tls_key_file": garbage}, "certificate or key"),
            (
                {
                    "tls_cert_file": pki.server_cert,
                    "tls_key_file": pki.server_key,
                    "tls_client_ca_file": garbage,
                },
                "client CA",
            ),
        ):
            result = subprocess.run(
                conveyor_command(
                    *server_argv(
                        database_url,
                        *(
                            f"--{key.removesuffix('_file').replace('_', '-')}={value}"
                            for key, value in options.items()
                        ),
                    )
                ),
                env=process_env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 1, result.stderr
            assert result.stderr.startswith("error: "), result.stderr
            assert message in result.stderr
            assert "Traceback" not in result.stderr

    def test_a_client_ca_that_is_not_pem_is_a_config_error_at_once(
        self, start_server: Callable[..., ServerThread], pki: Pki, tmp_path: Path
    ) -> None:
        """Before: gRPC logged its own complaint on each connection attempt, and the call
        failed as ServerUnavailable once its whole retry budget was spent."""
        server = start_server(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
        garbage = tmp_path / "ca.pem"
        garbage.write_text("not a certificate")
        with pytest.raises(ConfigError, match="is not in PEM format"):
            enqueue(server.address, TlsConfig(ca_file=garbage))
