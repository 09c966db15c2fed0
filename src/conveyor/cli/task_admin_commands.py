"""`conveyor tasks ...`: the operator's view of tasks, and the retry and cancel actions.

`tasks list` pages through tasks newest first, `tasks show` prints one task with its payload,
its explanation and its timeline, `tasks explain` only the explanation. `tasks retry` and
`tasks cancel` act on tasks by id, or by filter: an action by filter first asks the server
to count what it matches (a dry run), then asks the operator, and changes nothing unless
they agree or passed --yes. Without a terminal to ask on, it refuses instead of hanging.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table
from rich.text import Text

from conveyor.cli import output
from conveyor.cli.params import WireCount, WireText
from conveyor.cli.task_commands import (
    history_table,
    open_client,
    server_option,
    status_document,
)
from conveyor.client.core import MAX_BULK_LIMIT
from conveyor.client.sync_client import Client
from conveyor.codec import shown_text
from conveyor.types import TaskState, normalize_task_id

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from conveyor.types import BulkResult, TaskStatus

STATE_STYLES = {
    TaskState.QUEUED: "",
    TaskState.RUNNING: "cyan",
    TaskState.SUCCEEDED: "green",
    TaskState.FAILED: "red",
    TaskState.CANCELLED: "yellow",
}
ERROR_WIDTH = 60


@click.group()
def tasks() -> None:
    """Inspect tasks, retry and cancel them."""


def _state(state: TaskState) -> Text:
    return Text(state.value, style=STATE_STYLES[state])


def _attempts(status: TaskStatus) -> str:
    return f"{status.attempts}/{status.max_retries + 1}"


def _listing_document(status: TaskStatus) -> dict[str, Any]:
    document = status_document(status)
    # A listing carries neither; null would read as "no history" and "no result".
    del document["history"], document["history_omitted"], document["result"]
    return document


# The listing's columns in display order, each with the width it needs to be useful and
# its rank: on a narrow terminal the lowest-ranked columns are left out (the id and state
# never are), rather than every column being squeezed into unreadable stubs.
LIST_COLUMNS: tuple[tuple[str, int, int], ...] = (
    ("id", 36, 0),
    ("type", 12, 2),
    ("state", 9, 1),
    ("attempts", 8, 3),
    ("created", 8, 4),
    ("started\nfinished", 8, 5),
    ("worker", 14, 7),
    ("last error", 24, 6),
)
COLUMN_CHROME = 3  # a column's padding and border


def _fitting_columns(width: int) -> list[str]:
    chosen: set[str] = set()
    used = 1
    for name, need, _ in sorted(LIST_COLUMNS, key=lambda column: column[2]):
        if chosen and used + need + COLUMN_CHROME > width:
            break
        chosen.add(name)
        used += need + COLUMN_CHROME
    return [name for name, _, _ in LIST_COLUMNS if name in chosen]


def _task_table(statuses: Sequence[TaskStatus], width: int) -> Table:
    today = datetime.now(UTC)
    columns = _fitting_columns(width)
    hidden = len(LIST_COLUMNS) - len(columns)
    caption = f"{hidden} column(s) left out to fit; --json has them all" if hidden else None
    table = Table(title=f"{len(statuses)} task(s), newest first; times in UTC", caption=caption)
    for name in columns:
        # Short columns never wrap, so what does not fit squeezes the free text instead.
        if name in {"type", "worker"}:
            table.add_column(name, overflow="fold")
        elif name == "last error":
            table.add_column(name, max_width=ERROR_WIDTH)
        else:
            table.add_column(name, no_wrap=True)
    for status in statuses:
        cells = {
            "id": output.plain(status.id),
            "type": output.plain(status.type),
            "state": _state(status.state),
            "attempts": output.plain(_attempts(status)),
            "created": output.plain(output.short_when(status.created_at, today)),
            "started\nfinished": output.plain(
                f"{output.short_when(status.started_at, today)}\n"
                f"{output.short_when(status.finished_at, today)}"
            ),
            # The worker's own choice of id, possibly stored before the server refused
            # control characters in one.
            "worker": output.plain(status.worker_id),
            "last error": output.plain(output.truncate(shown_text(status.last_error), ERROR_WIDTH)),
        }
        output.row(table, *(cells[name] for name in columns))
    return table


@tasks.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([state.value for state in TaskState]),
    help="Only tasks in this state; repeat for several.",
)
@click.option("--type", "task_type", default=None, metavar="TYPE", help="Only tasks of TYPE.")
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=50,
    show_default=True,
    help="Tasks per page.",
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
def list_tasks(
    states: tuple[str, ...],
    task_type: str | None,
    limit: int,
    page_token: str | None,
    as_json: bool,
    server: str | None,
) -> None:
    """List tasks, newest queue position first (a retry renews it), one page at a time."""
    with open_client(server) as client:
        page = client.list_tasks(
            states=states or None, type=task_type, limit=limit, page_token=page_token
        )
    if as_json:
        document = {
            "tasks": [_listing_document(status) for status in page.tasks],
            "next_page_token": page.next_page_token,
        }
        click.echo(json.dumps(document, indent=2))
        return
    console = output.console()
    console.print(_task_table(page.tasks, console.width))
    if page.next_page_token:
        console.print(
            output.plain(f"more: add --page-token {page.next_page_token} (with the same filters)"),
            highlight=False,
        )


@tasks.command("show")
@click.argument("task_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_option
def show(task_id: str, as_json: bool, server: str | None) -> None:
    """Show a task: its fields, payload, why it is where it is, and its timeline."""
    with open_client(server) as client:
        # One call: the fields, the timeline and the explanation are one snapshot.
        found = client.get_task_status(task_id, history=True, payload=True, explain=True)
    payload = output.preview(found.payload or b"")
    result = output.preview(found.result)
    if as_json:
        document = status_document(found)
        document["result"] = result
        document["payload"] = payload
        document["explanation"] = list(found.explanation)
        click.echo(json.dumps(document, indent=2))
        return
    summary = Table.grid(padding=(0, 2))
    rows: list[tuple[str, str | None]] = [
        ("id", found.id),
        ("type", found.type),
        ("state", found.state.value),
        ("attempts", f"{_attempts(found)} (max_retries {found.max_retries})"),
        ("timeout", f"{found.timeout.total_seconds():g}s"),
        ("created", output.when(found.created_at, precise=True)),
        ("available", output.when(found.available_at, precise=True)),
        ("started", output.when(found.started_at, precise=True)),
        ("finished", output.when(found.finished_at, precise=True)),
        ("worker", found.worker_id),
        ("last error", shown_text(found.last_error)),
        ("progress", shown_text(found.progress)),
    ]
    for key, value in rows:
        if value is not None:
            output.row(summary, output.label(key), output.plain(value))
    for key, shown in (("payload", payload), ("result", result)):
        if shown is not None:
            output.row(summary, output.label(key), output.plain(output.describe_preview(shown)))
            if shown["size"]:
                output.row(summary, Text(""), output.plain(shown["preview"], fold=True))
    console = output.console()
    console.print(summary)
    console.print("\n[bold]why[/]")
    for reason in found.explanation:
        console.print(output.plain(f"- {reason}"))
    timeline = history_table(found, title="timeline", state=_state)
    console.print(timeline)


@tasks.command("explain")
@click.argument("task_id", metavar="ID")
@server_option
def explain(task_id: str, server: str | None) -> None:
    """Say in plain words why a task is where it is."""
    with open_client(server) as client:
        reasons = client.explain_task(task_id)
    for reason in reasons:
        click.echo(f"- {output.inert(reason)}")


# --- retry and cancel ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Action:
    """What `tasks retry` and `tasks cancel` differ in."""

    verb: str
    past: str
    applies_to: tuple[TaskState, ...]
    call: Callable[..., BulkResult]

    @property
    def states_text(self) -> str:
        """The states it applies to, as words."""
        return " or ".join(state.value for state in self.applies_to)


RETRY = Action("retry", "retried", (TaskState.FAILED, TaskState.CANCELLED), Client.retry_tasks)
CANCEL = Action("cancel", "cancelled", (TaskState.QUEUED, TaskState.RUNNING), Client.cancel_tasks)


def _bulk_command(action: Action, help_text: str) -> click.Command:
    @click.argument("task_ids", metavar="[ID]...", nargs=-1)
    @click.option(
        "--state",
        "states",
        multiple=True,
        type=click.Choice([state.value for state in action.applies_to]),
        help=f"{action.verb.capitalize()} the tasks in this state; repeat for several.",
    )
    @click.option("--type", "task_type", default=None, metavar="TYPE", help="Only tasks of TYPE.")
    @click.option(
        "--limit",
        # Bounded as the request's field is: a larger N was an error exit, not a usage one.
        type=WireCount(1, MAX_BULK_LIMIT),
        default=None,
        help="With a filter: act on at most N tasks, oldest first (queue order).",
    )
    @click.option("--reason", default="", type=WireText(), help="Recorded in each task's history.")
    @click.option("--yes", "-y", is_flag=True, help="Act on a filter's tasks without asking.")
    @server_option
    def command(
        task_ids: tuple[str, ...],
        states: tuple[str, ...],
        task_type: str | None,
        limit: int | None,
        reason: str,
        yes: bool,
        server: str | None,
    ) -> None:
        by_filter = bool(states) or task_type is not None
        if task_ids and by_filter:
            output.fail("give task ids or a filter (--state, --type), not both")
        if not task_ids and not by_filter:
            output.fail(f"give the ids of the tasks to {action.verb}, or a filter: --state, --type")
        with open_client(server) as client:
            if task_ids:
                if limit is not None:
                    output.fail("--limit applies to a filter, not to task ids")
                _by_ids(client, action, task_ids, reason)
            else:
                _by_filter(client, action, states, task_type, limit, reason, yes=yes)

    command.__doc__ = help_text
    return click.command(action.verb)(command)


def _by_ids(client: Client, action: Action, task_ids: Sequence[str], reason: str) -> None:
    order = {normalize_task_id(task_id): index for index, task_id in enumerate(task_ids)}
    result = action.call(client, task_ids=list(task_ids), reason=reason)
    for task_id in result.changed_ids:
        click.echo(f"{task_id} {action.past}")
    errors = []
    for task_id, state in sorted(result.skipped, key=lambda item: order.get(item[0], 0)):
        if action is CANCEL and state is TaskState.CANCELLED:
            # Cancelling is idempotent, as with `conveyor cancel`: the task is where asked.
            click.echo(f"{task_id} {action.past} (it already was)")
        else:
            errors.append(
                f"task {task_id} is {state.value}; only {action.states_text} tasks can be "
                f"{action.past}"
            )
    for message in errors:
        click.echo(f"error: {message}", err=True)
    if errors:
        raise click.exceptions.Exit(1)


def _by_filter(
    client: Client,
    action: Action,
    states: tuple[str, ...],
    task_type: str | None,
    limit: int | None,
    reason: str,
    *,
    yes: bool,
) -> None:
    chosen = " or ".join(states) if states else action.states_text
    what = f"state {chosen}" + (f", type {task_type}" if task_type else "")
    counted = action.call(
        client, states=states or None, type=task_type, dry_run=True, limit=limit or 0
    )
    matched = counted.matched
    click.echo(f"{matched} task(s) match: {what}" + (f" (at most {limit})" if limit else ""))
    if not matched:
        return
    if not yes:
        if not sys.stdin.isatty():
            output.fail(
                f"refusing to {action.verb} {matched} task(s) without confirmation: "
                "stdin is not a terminal (pass --yes)"
            )
        if not click.confirm(f"{action.verb.capitalize()} {matched} task(s)?", err=True):
            # The operator's choice, not an error: exit 0, as `rm -i` answered "n" does.
            click.echo(f"not confirmed; no task {action.past}", err=True)
            return
    # What the operator saw and agreed to: only tasks enqueued before the count (as_of), and
    # at most as many as counted; tasks that came to match since are left for another run.
    result = action.call(
        client,
        states=states or None,
        type=task_type,
        limit=matched,
        reason=reason,
        as_of=counted.as_of,
    )
    moved_on = matched - result.changed
    click.echo(
        f"{result.changed} task(s) {action.past}"
        # Counted, then changed state before the action reached them (finished, say, while
        # the operator read the question): left alone, and said, so the numbers add up.
        + (
            f"; {moved_on} no longer {chosen} by then (changed, or deleted by retention), "
            "left alone"
            if moved_on > 0
            else ""
        )
    )


retry = _bulk_command(
    RETRY,
    """Retry failed or cancelled tasks, by ID or by filter.

    A retried task goes back to the end of its queue with a new series of attempts; its
    history keeps the old ones. With a filter (--state, --type) the matching tasks are
    counted first, and you are asked before anything changes (unless --yes).
    """,
)
cancel = _bulk_command(
    CANCEL,
    """Cancel queued or running tasks, by ID or by filter.

    A running task's lease is revoked at once; its worker stops the handler at its next
    heartbeat. With a filter (--state, --type) the matching tasks are counted first, and
    you are asked before anything changes (unless --yes).
    """,
)
tasks.add_command(retry)
tasks.add_command(cancel)
