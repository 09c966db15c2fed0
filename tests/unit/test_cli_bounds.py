"""Out-of-range values of the options a component checks again are usage errors (exit 2).

`enqueue --max-retries` and `--timeout` (checked by `Task`) and `server --max-payload-bytes`
(checked by `ServerConfig`) were accepted by click and refused later, with an `error:` line
and exit 1, while the command reference promises exit 2 for a value out of range;
`server --retention-days 1e9` overflowed `timedelta` with a traceback, and `migrate
--lock-timeout` over PostgreSQL's own bound (about 24.8 days) failed in the database. Each
option now declares its component's bounds, so click refuses the value, names the flag and
shows the range in `--help`.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import click
import pytest
from click.testing import CliRunner

from conveyor.cli.main import cli
from conveyor.client.core import MAX_BULK_LIMIT
from conveyor.errors import ConfigError
from conveyor.server.config import MAX_PAYLOAD_BYTES_LIMIT
from conveyor.storage.migrate import LONGEST_LOCK_TIMEOUT, migrate
from conveyor.types import LARGEST_DURATION, MAX_RETRIES_LIMIT, MAX_TIMEOUT
from conveyor.worker.runtime import MAX_CONCURRENCY

# Should a value get through, the command fails at once on what follows (exit 1): the
# client has no server to reach in under a second, the server has no database and a
# non-loopback address without TLS. Nothing starts an embedded PostgreSQL.
ENQUEUE = ("--retry-for", "0.5", "enqueue", "x", "--server", "127.0.0.1:1")
SERVER = ("server", "--database-url", "postgresql://127.0.0.1:1/x", "--grpc-listen", "nowhere:1")
MIGRATE = ("migrate", "--database-url", "postgresql://127.0.0.1:1/x")
BULK = ("--retry-for", "0.5", "tasks", "cancel", "--type", "x", "--server", "127.0.0.1:1")

MAX_TIMEOUT_SECONDS = MAX_TIMEOUT.total_seconds()
LARGEST_DAYS = LARGEST_DURATION / timedelta(days=1)
LARGEST_HOURS = LARGEST_DURATION / timedelta(hours=1)
LONGEST_LOCK_SECONDS = LONGEST_LOCK_TIMEOUT.total_seconds()


def _option(command_path: tuple[str, ...], name: str) -> click.Option:
    ctx = click.Context(cli)
    command: click.Command | None = cli
    for part in command_path:
        assert isinstance(command, click.Group)
        command = command.get_command(ctx, part)
    assert command is not None
    return next(
        param for param in command.params if isinstance(param, click.Option) and name in param.opts
    )


class TestOutOfRangeIsAUsageError:
    @pytest.mark.parametrize(
        ("args", "option", "shown_range"),
        [
            ((*ENQUEUE, "--max-retries", "-1"), "--max-retries", f"0<=x<={MAX_RETRIES_LIMIT}"),
            (
                (*ENQUEUE, "--max-retries", str(MAX_RETRIES_LIMIT + 1)),
                "--max-retries",
                f"0<=x<={MAX_RETRIES_LIMIT}",
            ),
            ((*ENQUEUE, "--timeout", "0"), "--timeout", f"0<x<={MAX_TIMEOUT_SECONDS}"),
            ((*ENQUEUE, "--timeout", "-1"), "--timeout", f"0<x<={MAX_TIMEOUT_SECONDS}"),
            (
                (*ENQUEUE, "--timeout", str(MAX_TIMEOUT_SECONDS + 1)),
                "--timeout",
                f"0<x<={MAX_TIMEOUT_SECONDS}",
            ),
            (
                (*SERVER, "--max-payload-bytes", str(MAX_PAYLOAD_BYTES_LIMIT + 1)),
                "--max-payload-bytes",
                f"1<=x<={MAX_PAYLOAD_BYTES_LIMIT}",
            ),
            ((*SERVER, "--retention-days", "1e9"), "--retention-days", f"0<=x<={LARGEST_DAYS}"),
            (
                (*SERVER, "--worker-retention-hours", "1e9"),
                "--worker-retention-hours",
                f"0<=x<={LARGEST_HOURS}",
            ),
            (
                (*MIGRATE, "--lock-timeout", str(LONGEST_LOCK_SECONDS + 1)),
                "--lock-timeout",
                f"0.001<=x<={LONGEST_LOCK_SECONDS}",
            ),
            (
                ("worker", "x:y", "--concurrency", str(MAX_CONCURRENCY + 1)),
                "--concurrency",
                f"1<=x<={MAX_CONCURRENCY}",
            ),
            (
                ("dev", "--concurrency", str(MAX_CONCURRENCY + 1)),
                "--concurrency",
                f"1<=x<={MAX_CONCURRENCY}",
            ),
            ((*BULK, "--limit", "0"), "--limit", "x>=1"),
            # Its top, a uint64's, goes unnamed in --help ([x>=1]); an error names it.
            (
                (*BULK, "--limit", str(MAX_BULK_LIMIT + 1)),
                "--limit",
                f"is more than a request can carry ({MAX_BULK_LIMIT})",
            ),
        ],
        ids=[
            "max-retries-negative",
            "max-retries-over",
            "timeout-zero",
            "timeout-negative",
            "timeout-over",
            "max-payload-bytes-over",
            "retention-days-overflow",
            "worker-retention-hours-over",
            "lock-timeout-over-postgresql-limit",
            "worker-concurrency-over",
            "dev-concurrency-over",
            "bulk-limit-zero",
            "bulk-limit-over-uint64",
        ],
    )
    def test_the_value_is_refused_naming_the_flag_and_its_range(
        self, args: tuple[str, ...], option: str, shown_range: str
    ) -> None:
        """Exit 2 and click's one `Error:` line, not exit 1 (or a traceback) from inside."""
        result = CliRunner().invoke(cli, list(args))
        assert result.exit_code == 2, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.stderr
        assert errors[0].startswith(f"Error: Invalid value for '{option}'"), errors[0]
        assert shown_range in errors[0], errors[0]
        assert "Traceback" not in result.output

    @pytest.mark.parametrize(
        ("variable", "value"),
        [("CONVEYOR_RETENTION_DAYS", "1e9"), ("CONVEYOR_WORKER_RETENTION_HOURS", "1e9")],
    )
    def test_the_environment_variable_is_refused_as_its_flag(
        self, variable: str, value: str
    ) -> None:
        """The retention options also read the environment: the same usage error."""
        result = CliRunner().invoke(cli, list(SERVER), env={variable: value})
        assert result.exit_code == 2, result.output
        assert variable in result.stderr
        assert "Traceback" not in result.output


class TestTheBoundsAreTheComponentsOwn:
    @pytest.mark.parametrize(
        ("command", "name", "edges"),
        [
            (("enqueue",), "--max-retries", ("0", str(MAX_RETRIES_LIMIT))),
            (("enqueue",), "--timeout", ("1e-6", str(MAX_TIMEOUT_SECONDS))),
            (("server",), "--max-payload-bytes", ("1", str(MAX_PAYLOAD_BYTES_LIMIT))),
            (("server",), "--retention-days", ("0", str(LARGEST_DAYS))),
            (("server",), "--worker-retention-hours", ("0", str(LARGEST_HOURS))),
            (("migrate",), "--lock-timeout", ("0.001", str(LONGEST_LOCK_SECONDS))),
        ],
    )
    def test_each_end_of_the_range_is_accepted(
        self, command: tuple[str, ...], name: str, edges: tuple[str, str]
    ) -> None:
        """No value the component accepts is refused by the flag."""
        option = _option(command, name)
        for edge in edges:
            assert option.type.convert(edge, option, None) == float(edge)


class TestMigrateLockTimeout:
    @pytest.mark.parametrize("lock_timeout", [timedelta(0), LONGEST_LOCK_TIMEOUT * 2])
    def test_migrate_refuses_what_postgresql_would(self, lock_timeout: timedelta) -> None:
        """Checked before any statement: the connection is never used."""
        with pytest.raises(ConfigError, match=r"at most 2147483\.647 s"):
            asyncio.run(migrate(None, lock_timeout=lock_timeout))


def test_nan_is_refused_as_not_a_number_not_by_another_limit() -> None:
    """It said "not a finite number up to 1e+09", a limit that is not the option's."""
    result = CliRunner().invoke(cli, [*SERVER, "--retention-days", "nan"])
    assert result.exit_code == 2, result.output
    assert "'nan' is not a finite number" in result.stderr
    assert "1e+09" not in result.stderr


def test_a_retention_too_small_to_keep_says_so_and_how_to_keep_everything() -> None:
    """1e-12 days rounds to no time at all: refused, but no longer as "not positive (or
    None ...)", which read as wrong for a positive value and named a Python spelling."""
    result = CliRunner().invoke(cli, [*SERVER, "--retention-days", "1e-12"])
    assert result.exit_code == 1, result.output
    assert "rounds to 0" in result.stderr
    assert "--retention-days 0" in result.stderr
