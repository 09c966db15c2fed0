"""`conveyor workers` and `conveyor tasks explain`: what the cluster looks like to an operator."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click
from rich.console import Console
from rich.table import Table

from conveyor.cli.task_commands import server_option
from conveyor.client.sync_client import Client

# An event loop blocked this long between two heartbeats is flagged in the listing.
BLOCKED_LOOP_MS = 1000


@click.command()
@click.option("--all", "include_stopped", is_flag=True, help="Include stopped workers.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
def workers(include_stopped: bool, as_json: bool, server: str | None) -> None:
    """List registered workers: state, load, last heartbeat, event-loop health."""
    with Client(server) as client:
        found = client.list_workers(include_stopped=include_stopped)
    now = datetime.now(UTC)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "id": w.id,
                        "host": w.host,
                        "pid": w.pid,
                        "state": w.state,
                        "task_types": list(w.task_types),
                        "concurrency": w.concurrency,
                        "in_flight": w.in_flight,
                        "version": w.version,
                        "started_at": w.started_at.isoformat(),
                        "last_heartbeat_at": w.last_heartbeat_at.isoformat(),
                        "loop_lag_ms": w.loop_lag_ms,
                    }
                    for w in found
                ],
                indent=2,
            )
        )
        return
    table = Table(title=f"{len(found)} worker(s)")
    for column in ("id", "state", "host:pid", "types", "in flight", "last heartbeat", "loop"):
        table.add_column(column)
    for w in found:
        silent = (now - w.last_heartbeat_at).total_seconds()
        loop = f"[red]blocked {w.loop_lag_ms} ms[/]" if w.loop_lag_ms >= BLOCKED_LOOP_MS else "ok"
        table.add_row(
            w.id,
            w.state,
            f"{w.host}:{w.pid}",
            ", ".join(w.task_types),
            f"{w.in_flight}/{w.concurrency}",
            f"{silent:.1f}s ago",
            loop,
        )
    Console().print(table)


@click.group()
def tasks() -> None:
    """Inspect tasks."""


@tasks.command("explain")
@click.argument("task_id", metavar="ID")
@server_option
def explain(task_id: str, server: str | None) -> None:
    """Say in plain words why a task is where it is."""
    with Client(server) as client:
        reasons = client.explain_task(task_id)
    for reason in reasons:
        click.echo(f"- {reason}")
