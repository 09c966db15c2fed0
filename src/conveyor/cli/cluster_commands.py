"""`conveyor workers`, `stats`, `pause` and `resume`: the cluster as an operator sees it.

`workers` lists registered workers; `stats` shows the server's sampled numbers (the live
queue by type, workers by state, the last minute's outcomes, who leads), once or refreshed
in place until Ctrl-C; `pause` and `resume` stop and restart the leasing of one task type.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from conveyor.cli import output
from conveyor.cli.params import BoundedFloat, WireText
from conveyor.cli.task_commands import open_client, server_option
from conveyor.protocol.limits import DEFAULT_WORKERS_PER_PAGE, MAX_WORKERS_PER_PAGE
from conveyor.types import BLOCKED_LOOP_MS

if TYPE_CHECKING:
    from conveyor.types import ClusterStatus, WorkerInfo


@click.command()
@click.option("--all", "include_stopped", is_flag=True, help="Include stopped workers.")
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_WORKERS_PER_PAGE),
    default=DEFAULT_WORKERS_PER_PAGE,
    show_default=True,
    help="Workers per page.",
)
@click.option(
    "--page-token",
    default=None,
    type=WireText(),
    metavar="TOKEN",
    help="Continue where the last page ended.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
def workers(
    include_stopped: bool, limit: int, page_token: str | None, as_json: bool, server: str | None
) -> None:
    """List registered workers: state, load, last heartbeat, event-loop health.

    Lost workers and blocked event loops first, then the newest, one page at a time.
    """
    with open_client(server) as client:
        page = client.list_workers_page(
            include_stopped=include_stopped, limit=limit, page_token=page_token
        )
    found = page.workers
    now = datetime.now(UTC)

    def silent_for(w: WorkerInfo) -> float:
        # The server's age, by the database's clock: this machine's clock may be off.
        # A server older than `silent_for` leaves only the timestamp to compare with it.
        silent = w.silent_for if w.silent_for is not None else now - w.last_heartbeat_at
        return max(silent.total_seconds(), 0.0)

    if as_json:
        document = {
            "workers": [
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
                    "silent_for_seconds": round(silent_for(w), 3),
                    "loop_lag_ms": w.loop_lag_ms,
                }
                for w in found
            ],
            "total": page.total,
            "next_page_token": page.next_page_token,
        }
        click.echo(json.dumps(document, indent=2))
        return
    table = Table(title=f"{len(found)} worker(s), lost and blocked first")
    for column in ("id", "state", "host:pid", "types", "in flight", "last heartbeat", "loop"):
        table.add_column(column)
    for w in found:
        blocked = w.loop_lag_ms >= BLOCKED_LOOP_MS
        # The id, host and types are the worker's own words: plain text only.
        output.row(
            table,
            output.plain(w.id),
            output.plain(w.state),
            output.plain(f"{w.host}:{w.pid}"),
            output.plain(", ".join(w.task_types)),
            output.plain(f"{w.in_flight}/{w.concurrency}"),
            output.plain(f"{silent_for(w):.1f}s ago"),
            Text(f"blocked {w.loop_lag_ms} ms", style="red") if blocked else Text("ok"),
        )
    output.console().print(table)
    # On stderr: the table on stdout stays the table, for a pipe as for a person.
    left_out = _left_out(len(found), limit, page.total, page.next_page_token)
    if left_out:
        click.echo(left_out, err=True)


def _left_out(shown: int, limit: int, total: int | None, next_page_token: str | None) -> str:
    """What a page of the workers listing leaves out, in words; "" when nothing."""
    more = f"; more: add --page-token {next_page_token}" if next_page_token else ""
    if total is None:  # a server older than the count
        if shown < limit:
            return ""
        return f"showing {shown} workers; there may be more (the server does not count them)"
    if shown >= total:
        return ""
    return f"showing {shown} of {total} workers{more}"


@click.command()
@click.argument("task_type", metavar="TYPE")
@click.option(
    "--reason",
    default="",
    type=WireText(),
    help="Why; shown by `tasks explain`, `tasks show`, `stats`.",
)
@server_option
def pause(task_type: str, reason: str, server: str | None) -> None:
    """Stop leasing tasks of TYPE; running ones finish, queued ones wait."""
    with open_client(server) as client:
        changed = client.pause_type(task_type, reason=reason)
    click.echo(f"{task_type} paused" if changed else f"{task_type} was already paused")


@click.command()
@click.argument("task_type", metavar="TYPE")
@server_option
def resume(task_type: str, server: str | None) -> None:
    """Lease tasks of TYPE again."""
    with open_client(server) as client:
        changed = client.resume_type(task_type)
    click.echo(f"{task_type} resumed" if changed else f"{task_type} was not paused")


def _throughput(status: ClusterStatus) -> float:
    # The same definition as /status: tasks finished per second over the last minute, as
    # long as the server's sample of it was (55 to 60 s), so both show the same number.
    finished = status.succeeded_last_minute + status.failed_last_minute
    return round(finished / status.last_minute_seconds, 3)


def stats_document(status: ClusterStatus) -> dict[str, Any]:
    """The JSON form of a status, as printed by `conveyor stats --json`."""
    reasons = {paused.type: paused.reason for paused in status.paused_types}
    finished = status.succeeded_last_minute + status.failed_last_minute
    return {
        "version": status.version,
        "server_id": status.server_id,
        "is_leader": status.is_leader,
        "leader_id": status.leader_id,
        "leader_term": status.leader_term,
        "sampled_at": output.iso(status.sampled_at),
        "types": [
            {
                "type": item.type,
                "queued": item.queued,
                "running": item.running,
                "oldest_queued_seconds": item.oldest_queued_seconds,
                "paused": item.paused,
                "paused_reason": reasons.get(item.type),
            }
            for item in status.types
        ],
        # The types the server did not list one by one (it lists a bounded number), summed.
        "other_types": {
            "types": status.other_types.types,
            "queued": status.other_types.queued,
            "running": status.other_types.running,
            "oldest_queued_seconds": status.other_types.oldest_queued_seconds,
        },
        "paused_types": [
            {
                "type": item.type,
                "paused_at": output.iso(item.paused_at),
                "reason": item.reason,
                "paused_by": item.paused_by,
            }
            for item in status.paused_types
        ],
        "workers": status.workers,
        "last_minute": {
            "succeeded": status.succeeded_last_minute,
            "failed": status.failed_last_minute,
            "retried": status.retried_last_minute,
            "started": status.started_last_minute,
            "window_seconds": round(status.last_minute_seconds, 3),
            "throughput_per_second": _throughput(status),
            # As /status has it: the failed share of the finished (0 with none finished).
            "failure_rate": round(status.failed_last_minute / finished, 4) if finished else 0.0,
        },
    }


def render_stats(status: ClusterStatus) -> Group:
    """The stats view: who leads, the queue by type, workers, the last minute."""
    # Built from Text parts, not markup, and inert: a server id is free text chosen by the
    # operator, a pause reason by whoever paused.
    header = Text()
    if status.leader_id:
        header.append("leader ").append(output.inert(status.leader_id), style="bold")
        header.append(f" (term {status.leader_term})")
    else:
        header.append("no active leader", style="red")
        header.append(f" (last term {status.leader_term})")
    answered = f" · answered by {status.server_id}{' (leader)' if status.is_leader else ''}"
    sampled = f"sampled {output.when(status.sampled_at)}" if status.sampled_at else "no sample yet"
    header.append(output.inert(f"{answered} · version {status.version} · {sampled}"))
    reasons = {
        paused.type: output.inert(
            "; ".join(filter(None, (paused.reason, paused.paused_by and f"by {paused.paused_by}")))
        )
        for paused in status.paused_types
    }
    queue = Table(title="queue by type")
    queue.add_column("type")
    for column in ("queued", "running", "oldest queued"):
        queue.add_column(column, justify="right")
    queue.add_column("paused")
    for item in status.types:
        paused = Text("")
        if item.paused:
            paused = Text("paused", style="yellow")
            paused.append(f" ({reasons[item.type]})" if reasons.get(item.type) else "")
        output.row(
            queue,
            output.plain(item.type),
            output.plain(item.queued),
            output.plain(item.running),
            output.plain(f"{item.oldest_queued_seconds:.1f}s" if item.queued else "-"),
            paused,
        )
    other = status.other_types
    if other.types:
        output.row(
            queue,
            Text(f"{other.types} more types", style="italic"),
            output.plain(other.queued),
            output.plain(other.running),
            output.plain(f"{other.oldest_queued_seconds:.1f}s" if other.queued else "-"),
            Text(""),
        )
    workers = ", ".join(f"{count} {state}" for state, count in sorted(status.workers.items()))
    minute = (
        f"last minute: {status.succeeded_last_minute} succeeded, "
        f"{status.failed_last_minute} failed, {status.retried_last_minute} retried, "
        f"{status.started_last_minute} started · {_throughput(status):g} finished/s"
    )
    return Group(
        header,
        queue
        if status.types or other.types
        else Text("no queued or running tasks, no paused types"),
        output.plain(f"workers: {workers or 'none registered'}"),
        Text(minute),
    )


@click.command()
@click.option(
    "--interval",
    type=BoundedFloat(min=0.2),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one snapshot as JSON (implies --once)."
)
@server_option
def stats(interval: float, once: bool, as_json: bool, server: str | None) -> None:
    """Watch the cluster: the queue by type, workers, the last minute's outcomes."""
    with open_client(server) as client:
        if as_json:
            click.echo(json.dumps(stats_document(client.get_status()), indent=2))
            return
        console = output.console()
        if once:
            console.print(render_stats(client.get_status()))
            return
        try:
            with Live(
                render_stats(client.get_status()), console=console, auto_refresh=False
            ) as live:
                while True:
                    time.sleep(interval)
                    live.update(render_stats(client.get_status()), refresh=True)
        except KeyboardInterrupt:
            # Ctrl-C is how a live view is closed, not a failure.
            return
