"""Every command's `--help` renders, and says nothing a reader cannot use."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from conveyor.cli.main import cli


def _commands(
    group: click.Group, ctx: click.Context, path: tuple[str, ...]
) -> list[tuple[str, ...]]:
    found = [path]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        if isinstance(command, click.Group):
            found += _commands(command, ctx, (*path, name))
        else:
            found.append((*path, name))
    return found


COMMANDS = _commands(cli, click.Context(cli), ())


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "conveyor")
def test_help_renders_without_placeholders(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    # An unbounded click range once printed "x<=None" (enqueue --timeout).
    assert "None" not in result.output, result.output


def test_enqueue_timeout_help_states_its_limits() -> None:
    output = CliRunner().invoke(cli, ["enqueue", "--help"], terminal_width=200).output
    line = next(line for line in output.splitlines() if "--timeout" in line)
    assert "more than 0, at most 7 days" in line
    assert "[default: 300.0; 0<x<=604800.0]" in line


def test_server_heartbeat_interval_help_states_the_bound_enforced() -> None:
    """The help said "at most lease-ttl / 3" (the default's share) while the limit the server
    enforces (check_heartbeat_interval) is half of the lease."""
    output = CliRunner().invoke(cli, ["server", "--help"], terminal_width=200).output
    entry = " ".join(output.split("--heartbeat-interval", 1)[1].split("\n  --", 1)[0].split())
    assert "at most lease-ttl / 2" in entry, entry
