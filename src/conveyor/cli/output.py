"""Shared output helpers of the operator commands: the console, times, payload previews, errors.

Every command that prints a table takes its console from `console()`, formats times with
`when()`, adds rows with `row()`, which takes `Text` cells only (text from the server,
users, handlers or workers goes in through `plain()`, so rich never reads it as markup and
no escape sequence reaches the terminal), and reports a bad request with `fail()`: one
`error: ...` line on stderr and exit status 1, the same contract ConveyorGroup gives typed
errors.
"""

from __future__ import annotations

import os
import sys
import unicodedata
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from rich.table import Table

from conveyor.codec import is_sealed, sealed_key_id
from conveyor.monitoring.preview import as_text
from conveyor.text import utc_time
from conveyor.types import UNPRINTABLE_CATEGORIES

# Piped output has no terminal width to fit: rich's fallback of 80 columns would fold task
# ids in the middle, which breaks grep and copy-paste. COLUMNS still wins when set.
PIPE_WIDTH = 200
PREVIEW_BYTES = 200


def console() -> Console:
    """A console on stdout, wide enough not to fold ids when output is piped."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPE_WIDTH)


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit with status 1."""
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(1)


def when(value: datetime | None, *, precise: bool = False) -> str:
    """A timestamp in UTC for tables: seconds, or milliseconds when `precise`; "-" if None."""
    return "-" if value is None else utc_time(value, precise=precise)


def short_when(value: datetime | None, today: datetime) -> str:
    """A timestamp in UTC for a narrow column: the time alone if it is on `today`'s date."""
    if value is None:
        return "-"
    value = value.astimezone(UTC)
    if value.date() == today.astimezone(UTC).date():
        return value.strftime("%H:%M:%S")
    return value.strftime("%Y-%m-%d %H:%M")


def iso(value: datetime | None) -> str | None:
    """A timestamp for JSON output: ISO 8601, or None."""
    return value.isoformat() if value is not None else None


def inert(text: str) -> str:
    """`text` with terminal control, bidi-format and line-separator characters as escapes.

    Error messages, progress reports and history details come from handlers: an escape
    sequence in one must not clear the operator's screen or rewrite what it shows. The
    characters are the ones the server refuses in worker-supplied text.
    """
    return "".join(
        char
        if char in "\t\n" or unicodedata.category(char) not in UNPRINTABLE_CATEGORIES
        else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def plain(value: object, *, fold: bool = False, style: str = "") -> Text:
    """Text rich prints as is: a payload or an error may hold `[tags]` or escapes (`inert`).

    With `fold`, a word longer than the line (a hex dump) is broken across lines instead
    of being cut with an ellipsis. `style` applies to the whole text (never parsed from it).
    """
    text = "" if value is None else inert(str(value))
    return Text(text, style=style, overflow="fold" if fold else None)


def label(text: str) -> Text:
    """A fixed label in bold (a row's key in a summary)."""
    return Text(text, style="bold")


def row(table: Table, *cells: Text) -> None:
    """Add a row of `Text` cells to `table`; a `str` cell is a TypeError.

    rich reads a `str` cell as markup: a worker id such as `[/]x` made every listing it
    appeared in crash, `[link=...]` made a hyperlink, and ESC went to the terminal. Tables
    are built through here only (tests/unit/test_cli_output.py checks), so a new column
    cannot show server text any other way than through `plain()` or a styled `Text`.
    """
    for cell in cells:
        if not isinstance(cell, Text):
            raise TypeError(
                f"table cell {cell!r} is a {type(cell).__name__}, not rich Text: "
                "wrap it in output.plain()"
            )
    table.add_row(*cells)


def truncate(text: str | None, width: int) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    if not text:
        return ""
    line = " ".join(inert(text).split())
    return line if len(line) <= width else line[: width - 1] + "…"


def preview(data: bytes | None) -> dict[str, Any] | None:
    """The first PREVIEW_BYTES of a payload or result: UTF-8 text when it is text, else hex."""
    if data is None:
        return None
    if is_sealed(data):  # sealed by a codec whose key this process does not have
        return {
            "size": len(data),
            "encoding": "sealed",
            "preview": f"sealed with key {sealed_key_id(data) or '?'}",
            "truncated": False,
        }
    head = data[:PREVIEW_BYTES]
    text = as_text(head, complete=len(data) <= PREVIEW_BYTES)
    return {
        "size": len(data),
        "encoding": "utf-8" if text is not None else "hex",
        "preview": text if text is not None else head.hex(),
        "truncated": len(data) > PREVIEW_BYTES,
    }


def describe_preview(shown: dict[str, Any]) -> str:
    """One line saying what `preview` returned: size, encoding, and whether it is cut."""
    size = shown["size"]
    if not size:
        return "empty"
    kind = {
        "utf-8": "UTF-8 text",
        # Whether the variable is unset or holds other keys: it has no key for this one.
        "sealed": "encrypted, and CONVEYOR_PAYLOAD_KEYS holds no key that opens it",
    }.get(shown["encoding"], "binary, shown as hex")
    cut = f", first {PREVIEW_BYTES} shown" if shown["truncated"] else ""
    return f"{size} byte(s), {kind}{cut}"
