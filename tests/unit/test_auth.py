"""conveyor.auth: token format, the tokens file's validation, roles and the RPC table."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest

from conveyor.auth import (
    RPC_PERMISSIONS,
    Permission,
    Role,
    TokenFile,
    TokenRegistry,
    bearer_token,
    digest,
    new_token,
    permission_for,
)
from conveyor.errors import ConfigError, PermissionDenied, Unauthenticated
from conveyor.protocol.v1 import conveyor_pb2 as pb

if TYPE_CHECKING:
    from pathlib import Path


class TestTokens:
    def test_a_new_token_authenticates_as_its_principal_and_is_never_stored(self) -> None:
        token, entry = new_token("billing", Role.PRODUCER)
        assert token.startswith(f"cvy_{entry.token_id}_")
        assert token not in entry.as_toml()
        assert digest(token) in entry.as_toml()
        principal = TokenRegistry.from_toml(entry.as_toml()).authenticate(token)
        assert (principal.name, principal.role, principal.token_id) == (
            "billing",
            Role.PRODUCER,
            entry.token_id,
        )

    def test_wrong_unknown_and_expired_tokens_are_refused(self) -> None:
        token, entry = new_token("a", Role.VIEWER, expires_at=datetime(2030, 1, 1, tzinfo=UTC))
        registry = TokenRegistry.from_toml(entry.as_toml())
        other, _ = new_token("b", Role.VIEWER)
        for bad in (None, "", "cvy_", token[:-1] + ("A" if token[-1] != "A" else "B"), other):
            with pytest.raises(Unauthenticated):
                registry.authenticate(bad)
        assert registry.authenticate(token, now=datetime(2029, 12, 31, tzinfo=UTC))
        with pytest.raises(Unauthenticated, match="expired"):
            registry.authenticate(token, now=datetime(2030, 1, 1, tzinfo=UTC))

    def test_the_entry_round_trips_through_toml(self) -> None:
        _, entry = new_token(
            "mailers",
            Role.WORKER,
            expires_at=datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC),
            task_types=["send_email", "send_sms"],
        )
        (parsed,) = TokenRegistry.from_toml(entry.as_toml()).entries()
        assert parsed == entry

    def test_an_expiry_with_an_offset_is_reported_in_utc(self) -> None:
        token, entry = new_token(
            "a", Role.VIEWER, expires_at=datetime(2030, 1, 31, tzinfo=timezone(timedelta(hours=9)))
        )
        registry = TokenRegistry([entry])
        with pytest.raises(Unauthenticated, match="expired at 2030-01-30 15:00 UTC"):
            registry.authenticate(token, now=datetime(2031, 1, 1, tzinfo=UTC))

    @pytest.mark.parametrize("offset", ["+09:00", "-05:30", "Z"])
    def test_an_expiry_with_an_offset_keeps_its_instant_when_rewritten(self, offset: str) -> None:
        # `token revoke` rewrites every other entry with as_toml.
        text = (
            '[[token]]\nid = "0a1b2c3d"\nname = "ops"\nrole = "admin"\n'
            f'sha256 = "{"0" * 64}"\nexpires = 2030-01-31T00:00:00{offset}\n'
        )
        (read,) = TokenRegistry.from_toml(text).entries()
        (rewritten,) = TokenRegistry.from_toml(read.as_toml()).entries()
        assert rewritten.expires_at == read.expires_at

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("[[token]\n", "not valid TOML"),
            ("extra = 1\n", "unknown keys extra"),
            ('[[token]]\nid = "0011aabb"\n', "'name' is required"),
            (
                '[[token]]\nid = "xyz"\nname = "a"\nrole = "admin"\nsha256 = "' + "0" * 64 + '"',
                "'id' must be 8 hex",
            ),
            (
                '[[token]]\nid = "0011aabb"\nname = "a"\nrole = "root"\nsha256 = "'
                + "0" * 64
                + '"',
                "'role' must be one of",
            ),
            (
                '[[token]]\nid = "0011aabb"\nname = "a b"\nrole = "admin"\nsha256 = "'
                + "0" * 64
                + '"',
                "token name must be",
            ),
            (
                '[[token]]\nid = "0011aabb"\nname = "a"\nrole = "admin"\nsha256 = "abc"',
                "'sha256' must be 64 hex",
            ),
            (
                '[[token]]\nid = "0011aabb"\nname = "a"\nrole = "admin"\nsha256 = "'
                + "0" * 64
                + '"\nexpires = "tomorrow"',
                "TOML date-time",
            ),
            (
                '[[token]]\nid = "0011aabb"\nname = "a"\nrole = "admin"\nsha256 = "'
                + "0" * 64
                + '"\ntask_types = ["x"]',
                "only worker tokens",
            ),
        ],
    )
    def test_an_invalid_tokens_file_says_what_is_wrong(self, text: str, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            TokenRegistry.from_toml(text)

    def test_a_duplicate_id_is_refused(self) -> None:
        _, entry = new_token("a", Role.ADMIN)
        with pytest.raises(ConfigError, match="appears twice"):
            TokenRegistry.from_toml(entry.as_toml() + "\n" + entry.as_toml())

    def test_bearer_header_parsing(self) -> None:
        assert bearer_token("Bearer abc") == "abc"
        assert bearer_token("bearer  abc ") == "abc"
        assert bearer_token("Basic abc") is None
        assert bearer_token("Bearer ") is None
        assert bearer_token(None) is None


class TestTokenFile:
    def test_changes_take_effect_after_the_check_interval_and_bad_ones_never(
        self, tmp_path: Path
    ) -> None:
        """A stepped clock shows the file is looked at once per interval, not per call."""
        now = [0.0]
        first, first_entry = new_token("a", Role.ADMIN)
        second, second_entry = new_token("b", Role.ADMIN)
        path = tmp_path / "tokens.toml"
        path.write_text(first_entry.as_toml())
        errors: list[ConfigError] = []
        file = TokenFile(path, on_error=errors.append, check_interval=2.0, clock=lambda: now[0])
        path.write_text(second_entry.as_toml())
        assert file.authenticate(first).name == "a"  # not looked at yet
        now[0] = 2.5
        assert file.authenticate(second).name == "b"
        with pytest.raises(Unauthenticated):
            file.authenticate(first)
        path.write_text("not toml [")
        now[0] = 5.0
        assert file.authenticate(second).name == "b"
        assert len(errors) == 1
        assert file.last_error is errors[0]

    def test_a_missing_file_at_start_is_a_config_error(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="cannot read the tokens file"):
            TokenFile(tmp_path / "absent.toml")


class TestRoles:
    def test_every_rpc_of_every_service_has_a_permission(self) -> None:
        """A new RPC must be placed in the table deliberately (absent ones are admin-only)."""
        rpcs = {
            method.name
            for service in pb.DESCRIPTOR.services_by_name.values()
            for method in service.methods
        }
        assert rpcs == set(RPC_PERMISSIONS)
        assert permission_for("SomethingNew") is Permission.OPERATE

    def test_the_issue_s_role_matrix(self) -> None:
        """producer: enqueue/status/cancel; worker: work; viewer: read; admin: everything."""
        allowed = {
            role: {
                rpc
                for rpc, permission in RPC_PERMISSIONS.items()
                if new_token("x", role)[1].principal().may(permission)
            }
            for role in Role
        }
        assert allowed[Role.PRODUCER] == {
            "EnqueueTasks",
            "EnqueueStream",
            "GetTask",
            "CancelTask",
            "ExplainTask",
        }
        assert allowed[Role.WORKER] == {
            "RegisterWorker",
            "LeaseTasks",
            "Heartbeat",
            "ReportResult",
            "ReportResults",
            "UnregisterWorker",
            "Work",
        }
        assert allowed[Role.VIEWER] == {
            "GetTask",
            "ExplainTask",
            "ListWorkers",
            "GetLeader",
            "GetStatus",
            "ListTasks",
        }
        assert allowed[Role.ADMIN] == set(RPC_PERMISSIONS)

    def test_a_worker_token_limited_to_types(self) -> None:
        _, entry = new_token("m", Role.WORKER, task_types=["a", "b"])
        principal = entry.principal()
        principal.require_task_types(["a"])
        with pytest.raises(PermissionDenied, match="c"):
            principal.require_task_types(["a", "c"])

    def test_expiry_in_the_past_is_still_a_valid_entry(self) -> None:
        """Expired entries load (so `token list` can show them) but do not authenticate."""
        token, entry = new_token("a", Role.ADMIN, expires_at=datetime.now(UTC) - timedelta(1))
        registry = TokenRegistry.from_toml(entry.as_toml())
        assert len(registry) == 1
        with pytest.raises(Unauthenticated, match="expired"):
            registry.authenticate(token)


class TestClearTextTokens:
    def test_a_token_is_never_sent_in_clear_to_another_machine_unless_told(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from conveyor import Client, TlsConfig  # noqa: PLC0415 - the client side of the rule

        token, _ = new_token("app", Role.PRODUCER)
        for variable in ("CONVEYOR_TLS", "CONVEYOR_TLS_CA", "CONVEYOR_INSECURE"):
            monkeypatch.delenv(variable, raising=False)
        with pytest.raises(ConfigError, match="refusing to send a token in clear text"):
            Client("10.0.0.5:50051", token=token)
        # Loopback, TLS, no token, or an explicit trust in the network: all fine.
        Client("127.0.0.1:50051", token=token).close()
        Client("[::1]:50051", token=token).close()
        Client("10.0.0.5:50051", token=token, tls=TlsConfig()).close()
        Client("10.0.0.5:50051").close()
        monkeypatch.setenv("CONVEYOR_INSECURE", "1")
        Client("10.0.0.5:50051", token=token).close()

    def test_credentials_never_show_the_secret(self) -> None:
        from conveyor.client.channel import Credentials  # noqa: PLC0415 - the client side

        token, entry = new_token("app", Role.WORKER)
        secret = token.rsplit("_", 1)[1]
        shown = repr(Credentials.resolve(token=token, tls=False))
        assert secret not in shown
        assert f"cvy_{entry.token_id}_" in shown  # which token it is, without the secret
        assert "'...'" in repr(Credentials(token="not-a-conveyor-token"))  # noqa: S106

    def test_an_empty_token_is_called_empty_naming_its_file(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Not "not printable ASCII": an empty token file says which file is empty."""
        from conveyor.client.channel import Credentials  # noqa: PLC0415 - the client side

        empty = tmp_path / "token"
        empty.write_text("\n")
        monkeypatch.delenv("CONVEYOR_TOKEN", raising=False)
        monkeypatch.setenv("CONVEYOR_TOKEN_FILE", str(empty))
        with pytest.raises(ConfigError, match=re.escape(f"the token file '{empty}' is empty")):
            Credentials.resolve(tls=False)
        with pytest.raises(ConfigError, match="the token is empty"):
            Credentials.resolve(token=" ", tls=False)  # noqa: S106 - not a secret
        with pytest.raises(ConfigError, match="printable ASCII"):
            Credentials.resolve(token="tab\there", tls=False)  # noqa: S106 - not a secret
