"""Text that every part of Conveyor writes or checks the same way.

Times as people read them: the CLI's tables, the dashboard and the server's explanations
all print a moment in UTC in one format, so a time copied from one view is found in the
others. And whether a string can travel at all: protobuf strings are UTF-8, and a command
line argument or an environment variable holding other bytes reaches Python as lone
surrogates, which the clients and the CLI refuse, each with its own kind of error.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_time(moment: datetime, *, precise: bool = False) -> str:
    """`2026-12-05 08:22:20 UTC`, or with `precise` `2026-12-05 08:22:20.068 UTC`.

    Not ISO 8601's `2026-12-05T08:22:20.068422+00:00`: that is for machines (`--json`).
    """
    moment = moment.astimezone(UTC)
    millis = f".{moment.microsecond // 1000:03d}" if precise else ""
    return f"{moment:%Y-%m-%d %H:%M:%S}{millis} UTC"


def not_utf8(text: str) -> str | None:
    """The first part of `text` that is not a character (a lone surrogate); None if none."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return text[exc.start : exc.end]
    return None
