"""ServerConfig rejects impossible settings before anything starts."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from conveyor.client.channel import RetryPolicy, parse_addresses
from conveyor.errors import ConfigError
from conveyor.protocol.limits import (
    MAX_TRACE_ENTRIES,
    MAX_TRACE_KEY,
    MAX_TRACE_VALUE,
    PEER_MESSAGE_BYTES,
)
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.server.config import (
    MAX_PAYLOAD_BYTES_LIMIT,
    MIN_MESSAGE_BYTES,
    ServerConfig,
    default_worker_lost_after,
    split_host_port,
)
from conveyor.server.worker_service import WorkerService, lease_size_bound


class TestServerConfig:
    def test_defaults_are_valid(self) -> None:
        """A database URL is all a server needs."""
        config = ServerConfig(database_url="postgresql://localhost/x")
        assert config.lease_ttl == timedelta(seconds=30)
        assert config.max_payload_bytes == 1024 * 1024

    @pytest.mark.parametrize(
        "max_payload_bytes", [1, 1024 * 1024, 8 * 1024 * 1024, MAX_PAYLOAD_BYTES_LIMIT]
    )
    def test_a_message_of_leases_holds_at_least_one_largest_payload(
        self, max_payload_bytes: int
    ) -> None:
        """Leases are sent in messages of at most `lease_message_bytes`, never fewer than one."""
        config = ServerConfig(
            database_url="postgresql://localhost/x", max_payload_bytes=max_payload_bytes
        )
        assert config.max_message_bytes >= MIN_MESSAGE_BYTES
        assert max_payload_bytes < config.lease_message_bytes < config.max_message_bytes
        # ... and every message fits in what workers and clients accept.
        assert config.max_message_bytes <= PEER_MESSAGE_BYTES

    def test_a_payload_limit_over_the_ceiling_names_it_exactly(self) -> None:
        """The ceiling is 31.5 MiB; the message rounded it down to "31 MiB"."""
        with pytest.raises(ConfigError, match=r"at most 33030144 \(31\.5 MiB\)"):
            ServerConfig(
                database_url="postgresql://localhost/x",
                max_payload_bytes=MAX_PAYLOAD_BYTES_LIMIT + 1,
            )

    def test_a_raised_heartbeat_interval_raises_the_default_worker_lost_after(self) -> None:
        assert default_worker_lost_after(timedelta(seconds=3)) == timedelta(seconds=15)
        assert default_worker_lost_after(timedelta(seconds=16)) == timedelta(seconds=80)
        ServerConfig(  # accepted: five beats
            database_url="postgresql://localhost/x",
            lease_ttl=timedelta(seconds=40),
            heartbeat_interval=timedelta(seconds=16),
            worker_lost_after=default_worker_lost_after(timedelta(seconds=16)),
        )

    @pytest.mark.parametrize(
        ("overrides", "fragment"),
        [
            ({"database_url": ""}, "database_url"),
            ({"lease_ttl": timedelta(0)}, "lease_ttl"),
            (
                {"heartbeat_interval": timedelta(seconds=20)},
                r"heartbeat_interval \(20s\) must be at most half of lease_ttl \(30s\)",
            ),
            (
                # Healthy workers were marked lost between two heartbeats, and their tasks
                # ran again until their attempts ran out.
                {"heartbeat_interval": timedelta(seconds=16), "lease_ttl": timedelta(seconds=40)},
                r"worker_lost_after \(15s\) must be at least twice heartbeat_interval \(16s\)",
            ),
            ({"retry_backoff_cap": timedelta(milliseconds=1)}, "retry_backoff_cap"),
            ({"max_payload_bytes": 0}, "max_payload_bytes"),
            ({"max_payload_bytes": MAX_PAYLOAD_BYTES_LIMIT + 1}, "one message a worker accepts"),
            ({"max_enqueue_streams_per_token": 0}, "max_enqueue_streams_per_token"),
            # A client's status call and a worker's heartbeats waited behind the stream each
            # keeps open, past their deadlines.
            ({"max_streams_per_connection": 1}, "max_streams_per_connection must be at least 8"),
            ({"keepalive_interval": timedelta(0)}, "keepalive_interval"),
            ({"keepalive_timeout": timedelta(seconds=-1)}, "keepalive_timeout"),
            ({"grpc_listen": "nonsense"}, "HOST:PORT"),
            ({"http_listen": "host:99999"}, "HOST:PORT"),
        ],
    )
    def test_impossible_settings_raise_config_error(
        self, overrides: dict[str, object], fragment: str
    ) -> None:
        """Each bad setting is named in the error."""
        settings: dict[str, object] = {"database_url": "postgresql://localhost/x", **overrides}
        with pytest.raises(ConfigError, match=fragment):
            ServerConfig(**settings)  # type: ignore[arg-type]

    def test_database_urls_are_checked_before_anything_connects(self) -> None:
        """Every form asyncpg takes is accepted; a URL it would refuse, or whose port it
        would take modulo 65536, is a ConfigError that does not repeat the URL (it may hold
        a password). Before, ServerConfig took any text."""
        for url in [
            "postgresql://localhost/x",
            "postgres://user:se%40cret@db.example.com:5432/conveyor?sslmode=require",
            "postgresql://[::1]:5432,[fe80::1]/x",
            "postgresql://h1:5432,h2:5433/x?target_session_attrs=read-write",
            "postgresql:///x?host=/tmp/cvpg-1/data&port=5432",
            "postgresql://",
        ]:
            assert ServerConfig(database_url=url).database_url == url
        for url, fragment in [
            ("notaurl", "expected postgresql://"),
            ("http://se:cret@localhost/x", "expected postgresql://"),
            ("postgresql://localhost:99999/x", "port '99999'"),
            ("postgresql://se:cret@h1:5432,h2:0/x", "port '0'"),
            ("postgresql://[::1]:port/x", "port 'port'"),
            ("postgresql:///x?host=/tmp/s&port=65536", "port '65536'"),
            ("postgresql://[::1/x", "invalid database URL"),
        ]:
            with pytest.raises(ConfigError, match=fragment) as raised:
                ServerConfig(database_url=url)
            assert raised.value.message.startswith("invalid database URL: ")
            assert "cret" not in raised.value.message

    def test_listen_addresses_split_into_host_and_port(self) -> None:
        """IPv6 brackets are removed; an empty host means every interface."""
        assert split_host_port("127.0.0.1:50051") == ("127.0.0.1", 50051)
        assert split_host_port("[::1]:8080") == ("::1", 8080)
        assert split_host_port(":8080") == ("0.0.0.0", 8080)  # noqa: S104

    @pytest.mark.parametrize(
        ("server_id", "expected"),
        [
            ("", "1 to 200 characters"),
            ("s" * 201, "1 to 200 characters"),
            ("a\nERROR forged line", "U+000A at position 1"),
            ("a\u202eb", "U+202E at position 1"),
        ],
    )
    def test_a_server_id_is_printable_and_bounded(self, server_id: str, expected: str) -> None:
        """It goes into log lines, /status and the leader row: one with a newline forged a
        log line, and one of any length bloated them all."""
        with pytest.raises(ConfigError, match=re.escape(expected)):
            ServerConfig(database_url="postgresql://localhost/c", server_id=server_id)

    @pytest.mark.parametrize("port", ["\N{SUPERSCRIPT TWO}", "\u0668\u0660"])
    def test_a_port_of_digits_other_than_ascii_is_refused(self, port: str) -> None:
        """str.isdigit() takes both: "²" made int() raise ValueError (a traceback out of
        the CLI), and "٨٠" was read as port 80."""
        with pytest.raises(ConfigError, match="expected HOST:PORT"):
            split_host_port(f"127.0.0.1:{port}")


class TestAddresses:
    def test_comma_separated_addresses_are_split(self) -> None:
        """'a:1, b:2' is two addresses."""
        assert parse_addresses("a:1, b:2") == ["a:1", "b:2"]

    def test_environment_supplies_the_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """CONVEYOR_SERVER is read when no address is given, else localhost:50051."""
        monkeypatch.delenv("CONVEYOR_SERVER", raising=False)
        assert parse_addresses(None) == ["localhost:50051"]
        monkeypatch.setenv("CONVEYOR_SERVER", "h1:1,h2:2")
        assert parse_addresses(None) == ["h1:1", "h2:2"]

    @pytest.mark.parametrize(
        "bad",
        ["", "nohost", "host:", "host:port", ":123", "host:0", "host:65536", "host:117587", "h:²"],
    )
    def test_malformed_addresses_raise_config_error(self, bad: str) -> None:
        """Addresses must be HOST:PORT, the port within 1-65535 (gRPC would wrap it)."""
        with pytest.raises(ConfigError):
            parse_addresses(bad)


class TestRetryPolicy:
    def test_delays_have_full_jitter_under_a_doubling_ceiling(self) -> None:
        """Each delay lies in [0, min(cap, base * 2**n)]."""
        policy = RetryPolicy(
            backoff_base=timedelta(milliseconds=100), backoff_cap=timedelta(seconds=1)
        )
        delays = policy.delays()
        ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
        for ceiling in ceilings:
            delay = next(delays)
            assert 0 <= delay <= ceiling

    def test_jitter_spreads_retries(self) -> None:
        """Many clients retrying at once do not pick the same delay."""
        first_delays = {next(RetryPolicy().delays()) for _ in range(200)}
        assert len(first_delays) > 150

    def test_non_positive_durations_are_rejected(self) -> None:
        """A zero total timeout is a configuration error."""
        with pytest.raises(ConfigError):
            RetryPolicy(total_timeout=timedelta(0))

    def test_durations_may_be_seconds_as_a_task_timeout_may(self) -> None:
        """`RetryPolicy(total_timeout=5)` is 5 seconds, kept as a timedelta, as
        `Task(timeout=5)` is; it used to raise TypeError comparing an int with a timedelta.
        """
        policy = RetryPolicy(call_timeout=0.5, total_timeout=5, backoff_base=0.1, backoff_cap=1)
        assert policy == RetryPolicy(
            call_timeout=timedelta(milliseconds=500),
            total_timeout=timedelta(seconds=5),
            backoff_base=timedelta(milliseconds=100),
            backoff_cap=timedelta(seconds=1),
        )
        assert policy.total_timeout.total_seconds() == 5
        assert dataclasses.replace(policy, total_timeout=7).total_timeout == timedelta(seconds=7)

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            pytest.param(0, "total_timeout must be positive, got 0 s", id="zero"),
            pytest.param(-1.5, "total_timeout must be positive, got -1.5 s", id="negative"),
            pytest.param(
                float("nan"), "total_timeout must be a finite number of seconds, got nan", id="nan"
            ),
            pytest.param(
                float("inf"), "total_timeout must be a finite number of seconds, got inf", id="inf"
            ),
            pytest.param(
                1e300,
                "total_timeout may be at most 36500 days (3153600000 s), got 1e+300 s",
                id="1e300",
            ),
            pytest.param(
                "5", "total_timeout must be a timedelta or a number of seconds, not str", id="str"
            ),
            pytest.param(
                True,
                "total_timeout must be a timedelta or a number of seconds, not bool",
                id="bool",
            ),
        ],
    )
    def test_impossible_durations_are_config_errors(self, value: object, message: str) -> None:
        """Never a TypeError, ValueError or OverflowError: a ConfigError naming the field."""
        with pytest.raises(ConfigError) as raised:
            RetryPolicy(total_timeout=value)  # type: ignore[arg-type]
        assert raised.value.message == message


class TestLeaseSizeBound:
    @pytest.mark.parametrize("payload_bytes", [0, 100, 3 * 1024 * 1024])
    @pytest.mark.parametrize("text", ["ascii", 'é€😀"\\'])
    def test_the_bound_covers_the_largest_lease(self, payload_bytes: int, text: str) -> None:
        """Leases are packed into messages by `lease_size_bound`, not by encoding them: it must
        be at least the encoded size, with every other field as large as it may be (a type of
        128 characters, 8 trace entries of 64 and 512 characters, non-ASCII ones included).
        The trace context is the JSON text PostgreSQL returns for the stored jsonb, which
        writes non-ASCII characters as they are, not escaped: counted in characters, not
        bytes, the bound fell short by up to 3 bytes a character."""
        now = datetime.now(UTC)
        entries = {
            f"{index}{text * 64}"[:MAX_TRACE_KEY]: (text * 512)[:MAX_TRACE_VALUE]
            for index in range(MAX_TRACE_ENTRIES)
        }
        row = {
            "id": uuid.uuid4(),
            "lease_id": uuid.uuid4(),
            "type": "t" * 128,
            "payload": b"p" * payload_bytes,
            "attempt": 2**32 - 1,
            "max_retries": 2**32 - 1,
            "timeout": timedelta(days=3650),
            "lease_expires_at": now,
            "deadline_at": now,
            "trace_context": json.dumps(entries, sort_keys=True, ensure_ascii=False),
        }
        in_a_message = pb.LeaseTasksResponse(leases=[WorkerService.lease_message(row)])
        assert in_a_message.ByteSize() <= lease_size_bound(row)
