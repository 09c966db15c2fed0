"""`conveyor enqueue`, `conveyor status` and `conveyor cancel`: the producer's view."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click
from rich.table import Table

from conveyor.cli import output
from conveyor.cli.main import DEFAULT_RETRY_FOR, RETRY_FOR_KEY
from conveyor.cli.params import BoundedFloat
from conveyor.client.channel import RetryPolicy
from conveyor.client.sync_client import Client
from conveyor.codec import AesGcmCodec, is_sealed, sealed_key_id, shown_text
from conveyor.errors import InvalidTask, SealError
from conveyor.types import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    MAX_RETRIES_LIMIT,
    MAX_TIMEOUT,
    Task,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.text import Text

    from conveyor.codec import PayloadCodec
    from conveyor.types import TaskState, TaskStatus

server_option = click.option(
    "--server",
    envvar="CONVEYOR_SERVER",
    default=None,
    metavar="ADDR",
    help="Server address(es), comma separated (default: CONVEYOR_SERVER or localhost:50051).",
)


def open_client(server: str | None) -> Client:
    """A Client for a command: `--server`'s addresses, retried for the root's `--retry-for`.

    A script that checks on a server wants its answer in the time it chose, not the
    library's 30 s. The budget bounds each call too (RetryLoop gives a call no more than
    what is left of it), so a slow bulk action under a short budget ends unanswered. The
    payload codec of CONVEYOR_PAYLOAD_KEYS, if any, shows what it cannot open as sealed
    (`SealedShown`).
    """
    retry_for = click.get_current_context().meta.get(RETRY_FOR_KEY, DEFAULT_RETRY_FOR)
    codec = AesGcmCodec.from_env()
    return Client(
        server,
        retry=RetryPolicy(total_timeout=retry_for),
        codec=SealedShown(codec) if codec is not None else None,
    )


class SealedShown:
    """A codec for commands that show tasks: what it cannot open is shown as sealed.

    A payload or result sealed with a key this process lacks (one retired from its set,
    another producer's) made `status` and `tasks show` fail as a whole, with no state,
    attempts or error shown; now it is previewed as "sealed with key ID", as it is when the
    process has no keys at all. Sealing (`enqueue`) is the codec's own.
    """

    def __init__(self, codec: PayloadCodec) -> None:
        """Wrap the codec of CONVEYOR_PAYLOAD_KEYS."""
        self._codec = codec

    def seal(self, data: bytes, *, field: str, task_id: str) -> bytes:
        """Seal as the codec does."""
        return self._codec.seal(data, field=field, task_id=task_id)

    def open(self, data: bytes, *, field: str, task_id: str) -> bytes:
        """Open as the codec does; `data` still sealed if it cannot."""
        try:
            return self._codec.open(data, field=field, task_id=task_id)
        except SealError:
            return data


@click.command()
@click.argument("task_type", metavar="TYPE")
@click.option(
    "--payload",
    default=None,
    help="Payload: the argument's bytes as given (text as typed, normally UTF-8).",
)
@click.option(
    "--payload-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read the payload from a file ('-' for stdin).",
)
# Task's own bounds: a value it would refuse is a usage error naming the flag (exit 2).
@click.option(
    "--timeout",
    type=BoundedFloat(min=0, min_open=True, max=MAX_TIMEOUT.total_seconds()),
    default=DEFAULT_TIMEOUT.total_seconds(),
    show_default=True,
    help="Seconds allowed per attempt: more than 0, at most 7 days.",
)
@click.option(
    "--max-retries",
    type=click.IntRange(0, MAX_RETRIES_LIMIT),
    default=DEFAULT_MAX_RETRIES,
    show_default=True,
    help="Attempts after the first one.",
)
@click.option("--id", "task_id", default=None, help="Task id (UUID); generated if absent.")
@server_option
def enqueue(
    task_type: str,
    payload: str | None,
    payload_file: Path | None,
    timeout: float,
    max_retries: int,
    task_id: str | None,
    server: str | None,
) -> None:
    """Enqueue a task of TYPE and print its id."""
    if payload is not None and payload_file is not None:
        raise InvalidTask("give --payload or --payload-file, not both")
    if payload_file is not None:
        data = _read_stdin() if str(payload_file) == "-" else _read(payload_file)
    else:
        data = _argument_bytes(payload or "", "--payload")
    task = Task(
        type=task_type,
        payload=data,
        timeout=timeout,  # seconds
        max_retries=max_retries,
        id=task_id,
    )
    with open_client(server) as client:
        click.echo(client.enqueue_task(task))


def _argument_bytes(text: str, option: str) -> bytes:
    r"""The bytes an argument was given as on the command line.

    Python decodes argv with the locale's encoding and keeps each byte that does not
    decode as a lone surrogate (surrogateescape): `--payload $'\xff\xfe'` arrives as
    '\udcff\udcfe', which str.encode() refuses with a UnicodeEncodeError. os.fsencode
    reverses the decoding exactly, so the payload is the bytes that were typed, valid text
    or not. Only a caller that builds the arguments itself (another program calling
    `cli.main`) can pass a surrogate that no byte decodes to.
    """
    try:
        return os.fsencode(text)
    except UnicodeEncodeError as exc:
        raise InvalidTask(
            f"{option} holds {text[exc.start : exc.end]!r}, which is no character and no "
            "byte of the command line; give binary payloads with --payload-file"
        ) from None


def _read_stdin() -> bytes:
    return sys.stdin.buffer.read()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidTask(f"cannot read {path}: {exc.strerror}") from None


def _preview(data: bytes | None, limit: int = 200) -> str | None:
    if data is None:
        return None
    if is_sealed(data):  # with no key for it here: its escaped bytes said nothing
        return f"sealed with key {sealed_key_id(data) or '?'}"
    text = data[:limit].decode("utf-8", errors="backslashreplace")
    return text + ("..." if len(data) > limit else "")


_TIMESTAMPS: Final = frozenset(
    {"created_at", "available_at", "started_at", "finished_at", "progress_at"}
)
# Fields a worker may have sealed with its codec (what the client could not open stays so).
_HANDLER_TEXT: Final = frozenset({"last_error", "progress"})


def status_document(status: TaskStatus) -> dict[str, Any]:
    """The JSON form of a status, as printed by `conveyor status --json`."""
    return {
        "id": status.id,
        "type": status.type,
        "state": status.state.value,
        "attempts": status.attempts,
        "max_retries": status.max_retries,
        "timeout_seconds": status.timeout.total_seconds(),
        "created_at": output.iso(status.created_at),
        "available_at": output.iso(status.available_at),
        "started_at": output.iso(status.started_at),
        "finished_at": output.iso(status.finished_at),
        "worker_id": status.worker_id,
        "last_error": status.last_error,
        "progress": status.progress,
        "progress_at": output.iso(status.progress_at),
        "result": _preview(status.result, limit=10_000),
        "history": [
            {
                "at": output.iso(event.at),
                "event": event.event,
                "state": event.state.value,
                "attempt": event.attempt,
                "worker_id": event.worker_id,
                "detail": event.detail,
                "by": event.actor,
            }
            for event in status.history
        ],
        # Events left out between the first one in `history` and the rest (a long history
        # is sent as its first event and the latest ones).
        "history_omitted": status.history_omitted,
    }


def omitted_caption(status: TaskStatus) -> str | None:
    """What a history table says of the events the server left out, if it left any."""
    count = status.history_omitted
    if not count:
        return None
    return f"{count} event{'s' if count != 1 else ''} between the first and the next not shown"


def history_table(
    found: TaskStatus, *, title: str, state: Callable[[TaskState], Text] | None = None
) -> Table:
    """A task's history as a table: when, what, by which worker, and who asked (`by`).

    `state`: how a state is shown (plain text unless given). Shared by `status --history`
    and `tasks show`, so that both name the actor of an operator's action.
    """
    table = Table(title=title, caption=omitted_caption(found))
    # The time whole on one line however narrow the terminal (the other columns wrap):
    # cut, it lost its milliseconds at 80 columns and its minutes at 60.
    table.add_column("at", no_wrap=True, min_width=len(output.when(found.created_at, precise=True)))
    for column in ("event", "state", "attempt", "worker", "detail", "by"):
        table.add_column(column)
    for event in found.history:
        # The worker id is the worker's own choice, possibly stored before the server
        # refused control characters in one: every cell goes in as plain text.
        output.row(
            table,
            output.plain(output.when(event.at, precise=True)),
            output.plain(event.event),
            state(event.state) if state is not None else output.plain(event.state.value),
            output.plain(event.attempt),
            output.plain(event.worker_id),
            output.plain(shown_text(event.detail)),
            output.plain(event.actor),
        )
    return table


@click.command()
@click.argument("task_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--history",
    is_flag=True,
    help="Include the task's history (its first event and up to 1000 latest ones).",
)
@server_option
def status(task_id: str, as_json: bool, history: bool, server: str | None) -> None:
    """Show a task's state (and its history)."""
    with open_client(server) as client:
        found = client.get_task_status(task_id, history=history)
    if as_json:
        document = status_document(found)
        if not history:
            document.pop("history")
            document.pop("history_omitted")
        click.echo(json.dumps(document, indent=2))
        return
    console = output.console()
    summary = Table.grid(padding=(0, 2))
    for key, value in status_document(found).items():
        if key in ("history", "history_omitted") or value is None:
            continue
        # As every other view shows time (conveyor.text; the JSON keeps ISO 8601), and a
        # handler's sealed text as the explanation and the dashboard do (the JSON keeps it).
        shown: object = value
        if key in _TIMESTAMPS:
            shown = output.when(getattr(found, key), precise=True)
        elif key in _HANDLER_TEXT:
            shown = shown_text(value)
        output.row(summary, output.label(key), output.plain(shown))
    console.print(summary)
    if history:
        table = history_table(found, title="history")
        console.print(table)


@click.command()
@click.argument("task_id", metavar="ID")
@server_option
def cancel(task_id: str, server: str | None) -> None:
    """Cancel a queued or running task."""
    with open_client(server) as client:
        found = client.cancel_task(task_id)
    click.echo(f"{found.id} {found.state.value}")
