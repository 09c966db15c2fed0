"""Structured logging: the task context of log records, the text and JSON formats, and setup.

This module (it needs only `types`) owns how Conveyor's log lines look and what they
carry. A context variable holds the fields of the work in progress (`worker_id`,
`task_id`, `task_type`, `attempt`, `lease_id`); the worker binds them with
`bind_task_fields` in each attempt's own asyncio task (`log_context` binds them around a
block), and `ContextFilter`, installed on the output handler, copies them onto every record
emitted meanwhile, including records from the user's own loggers inside a handler.
`JsonFormatter` writes one JSON object per line; `TextFormatter` is the human format with
the task fields appended. Neither lets a message break its line: a message may carry what a
worker or a handler chose (a worker id, an error), and a newline in it would forge a log
line of its own, so the text format shows control and format characters as escapes, as
JSON does. `configure_logging` is what the `conveyor` CLI calls; applications that
configure logging themselves add `ContextFilter` to their handlers to get the same fields.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import logging
import sys
import unicodedata
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any, Final, Literal

from conveyor.types import UNPRINTABLE_CATEGORIES

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, MutableMapping

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")
# Where the CLI records the chosen format (click context meta), for commands that print.
LOG_FORMAT_KEY: Final = "conveyor.log_format"

# The fields `log_context` binds, in the order the formats show them.
CONTEXT_FIELDS: Final = ("worker_id", "task_id", "task_type", "attempt", "lease_id")

_EMPTY: Final[Mapping[str, str | int]] = MappingProxyType({})
# An immutable mapping per binding: a nested `log_context` builds a new one, so what an
# enclosing block (or a copied context in a handler thread) sees never changes under it.
_fields: contextvars.ContextVar[Mapping[str, str | int]] = contextvars.ContextVar(
    "conveyor_log_context", default=_EMPTY
)

# Attributes every LogRecord has; anything else on a record came from `extra` or a filter.
_RECORD_ATTRIBUTES: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

_TEXT_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# JSON escapes C0 controls itself; these it writes raw (ensure_ascii=False), and a shipper
# that splits lines the way str.splitlines() does would split a line at each.
_JSON_LINE_BREAKS: Final = {
    ord("\x85"): "\\u0085",
    ord("\u2028"): "\\u2028",
    ord("\u2029"): "\\u2029",
}


def escape_controls(text: str) -> str:
    """`text` with control, format and line-separator characters as backslash escapes.

    Those are the characters no worker text may hold (`types.UNPRINTABLE_CATEGORIES`): CR
    and LF start a forged line, ESC rewrites a terminal, bidi overrides reorder a line.
    Tab stays.
    """
    if text.isprintable():  # none of them (the common case, checked in C)
        return text
    return "".join(
        char
        if char == "\t" or unicodedata.category(char) not in UNPRINTABLE_CATEGORIES
        else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


@contextlib.contextmanager
def log_context(
    *,
    worker_id: str | None = None,
    task_id: str | None = None,
    task_type: str | None = None,
    attempt: int | None = None,
    lease_id: str | None = None,
) -> Iterator[None]:
    """Bind fields to every record logged in this block (this thread or asyncio task).

    Fields given here add to (or replace) those bound by an enclosing block; None leaves a
    field as it was. asyncio tasks created inside the block inherit the fields; a thread
    does only when started through `contextvars.copy_context().run` (as the worker does).
    """
    given = {
        "worker_id": worker_id,
        "task_id": task_id,
        "task_type": task_type,
        "attempt": attempt,
        "lease_id": lease_id,
    }
    merged = {**_fields.get(), **{k: v for k, v in given.items() if v is not None}}
    token = _fields.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _fields.reset(token)


def bind_task_fields(*, task_id: str, task_type: str, attempt: int, lease_id: str) -> None:
    """Bind an attempt's fields for the rest of the current asyncio task, with no block.

    For the top-level coroutine of an asyncio task only: a task runs in its own copy of its
    creator's context, so the binding ends with the task and needs no reset. The worker
    binds each attempt this way; `log_context`'s block costs several times as much.
    """
    _fields.set(
        MappingProxyType(
            {
                **_fields.get(),
                "task_id": task_id,
                "task_type": task_type,
                "attempt": attempt,
                "lease_id": lease_id,
            }
        )
    )


def context_fields() -> Mapping[str, str | int]:
    """The fields bound by the enclosing `log_context` blocks (empty outside any)."""
    return _fields.get()


class ContextFilter(logging.Filter):
    """Adds the bound context fields to each record; a field already on a record wins.

    Install it on a handler, not a logger: a logger's filters see only records logged on
    that very logger, while a handler's see every record that reaches it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate `record`; never drops it."""
        for name, value in _fields.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class ContextAdapter(logging.LoggerAdapter[logging.Logger]):
    """A LoggerAdapter that merges instead of replacing the caller's `extra`.

    Python 3.11's LoggerAdapter throws away the `extra` of each call (`event`, say) in
    favour of its own. This one keeps both, and also adds the bound context fields, so its
    records carry them even where no `ContextFilter` is installed. Precedence: the call's
    `extra`, then the adapter's, then the bound context.
    """

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        """Merge the extras."""
        kwargs["extra"] = {**_fields.get(), **(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, every extra field, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record`; values JSON cannot represent are written as their str()."""
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = _extra_fields(record)
        # The context fields first, always in the same order: lines are read by people too.
        for key in (*(name for name in CONTEXT_FIELDS if name in extra), *extra):
            # An extra named like a base key must not hide what the line is.
            document.setdefault(key, extra[key])
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes newlines, so a multi-line message or traceback stays one line.
        return json.dumps(document, default=str, ensure_ascii=False).translate(_JSON_LINE_BREAKS)


class TextFormatter(logging.Formatter):
    """`time level logger: message`, then `task=<id> type=<type> attempt=<n>` when bound."""

    def __init__(self) -> None:
        """Use the CLI's historical layout."""
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - stdlib name
        """The line without the traceback, which `format` appends after the task fields."""
        message = escape_controls(record.message)
        if message is not record.message:
            # A copy: other handlers format the same record, and the record is the caller's.
            record = copy.copy(record)
            record.message = message
        line = super().formatMessage(record)
        task_id = getattr(record, "task_id", None)
        if task_id is None:
            return line
        return (
            f"{line} task={task_id} type={getattr(record, 'task_type', '?')} "
            f"attempt={getattr(record, 'attempt', '?')}"
        )


class _StreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler whose failures never reach the code that logged.

    logging reports a line it could not write by printing to sys.stderr, and lets out any
    error but OSError doing so. With the stream closed (a handler closed sys.stderr), every
    log call raised ValueError: a worker's attempt ended in a log line before its report,
    and its task waited for a lease expiry that blamed a healthy worker.
    """

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        with contextlib.suppress(Exception):
            super().handleError(record)


def make_handler(fmt: LogFormat = "text", stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler with the chosen format and the context filter."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(LOG_FORMATS)}")
    handler = _StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(
    level: str | int = "info", fmt: LogFormat = "text", stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record to stderr (or `stream`) in `fmt`; return the handler installed.

    Calling it again replaces the handler it installed before and leaves any other handler
    of the root logger alone. Python warnings are routed through logging too, so that in
    the JSON format they do not break the one-object-per-line stream.
    """
    handler = make_handler(fmt, stream)
    handler.set_name("conveyor")
    root = logging.getLogger()
    for previous in list(root.handlers):
        if previous.get_name() == "conveyor":
            root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(capture=True)
    return handler
