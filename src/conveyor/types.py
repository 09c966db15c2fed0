"""Leaf value types shared by clients, workers and the server: Task, TaskState, TaskStatus.

Validation of what a producer may submit lives here too (`Task.__post_init__`), so the
client rejects a bad task before any network call and the server applies the same rules
to whatever arrives on the wire.
"""

from __future__ import annotations

import enum
import math
import os
import re
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Final

from conveyor.errors import ConfigError, InvalidTask
from conveyor.text import not_utf8

if TYPE_CHECKING:
    from collections.abc import Callable

    from conveyor.errors import ConveyorError

TASK_TYPE_PATTERN = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
DEFAULT_TIMEOUT = timedelta(minutes=5)
DEFAULT_MAX_RETRIES = 3
# Ceilings that keep integer columns and timers sane; real limits are far below.
MAX_TIMEOUT = timedelta(days=7)
_NO_TIME: Final = timedelta(0)
MAX_RETRIES_LIMIT = 1000
_SHOWN_ID_LENGTH = 64  # of a malformed id, in error messages


class TaskState(enum.StrEnum):
    """Where a task is in its life. QUEUED and RUNNING are live; the rest are final.

    A QUEUED task may be waiting out a retry backoff until its `available_at`: stored as
    `scheduled`, out of the queue the claim reads (migration 0015), and read back as QUEUED.
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def _missing_(cls, value: object) -> TaskState | None:
        return cls.QUEUED if value == "scheduled" else None

    @property
    def is_final(self) -> bool:
        """Whether the task can no longer change state by itself."""
        return self in _FINAL_STATES


_FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


# The RFC 4122 variant digit ("8", "9", "a" or "b") for a random hex digit.
_VARIANT_DIGIT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_task_ids(count: int) -> list[str]:
    """`count` new UUIDv7 strings for one batch, each laid out as `new_task_id`'s.

    48 bits of Unix milliseconds (one reading for the batch), version 7, the RFC 4122
    variant and 74 random bits, in canonical form; one `os.urandom` call for the whole
    batch instead of a read and a `uuid.UUID` per id.
    """
    unix_ms = time.time_ns() // 1_000_000
    stamp = f"{unix_ms & 0xFFFF_FFFF_FFFF:012x}"
    head = f"{stamp[:8]}-{stamp[8:]}-7"
    # 20 random hex digits per id, of which 19 are used: 3 (rand_a), one for the 2 random
    # bits of the variant digit, then 15 (the rest of rand_b).
    rand = os.urandom(10 * count).hex()
    variant = _VARIANT_DIGIT
    return [
        f"{head}{rand[i : i + 3]}-{variant[rand[i + 3]]}{rand[i + 4 : i + 7]}-"
        f"{rand[i + 7 : i + 19]}"
        for i in range(0, 20 * count, 20)
    ]


def new_task_id() -> str:
    """Return a new UUIDv7 string: time-ordered, so ids sort roughly by creation."""
    return new_task_ids(1)[0]


_CANONICAL_UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def normalize_task_id(task_id: str) -> str:
    """Return the canonical form of a task id, or raise InvalidTask if it is not a UUID."""
    if not isinstance(task_id, str):
        raise InvalidTask(f"task id must be a string, not {type(task_id).__name__}", field="id")
    if _CANONICAL_UUID.fullmatch(task_id):
        # Every id Conveyor hands out is already canonical; this is 4x cheaper than a
        # round trip through uuid.UUID, and a server checks two ids per report.
        return task_id
    try:
        return str(uuid.UUID(task_id))
    except ValueError:
        shown = task_id if len(task_id) <= _SHOWN_ID_LENGTH else task_id[:_SHOWN_ID_LENGTH] + "..."
        raise InvalidTask(f"malformed task id {shown!r}: expected a UUID", field="id") from None


def validate_task_type(task_type: object) -> str:
    """Return `task_type` if it is a valid type name, else raise InvalidTask."""
    if not isinstance(task_type, str):
        raise InvalidTask("task type must be a string", field="type")
    if not task_type:
        raise InvalidTask("task type must not be empty", field="type")
    if len(task_type) > 128:  # noqa: PLR2004 - the documented limit
        raise InvalidTask(
            f"task type is {len(task_type)} characters long; the limit is 128", field="type"
        )
    if not TASK_TYPE_PATTERN.fullmatch(task_type):
        raise InvalidTask(
            f"task type {task_type!r} may only contain letters, digits and _ . : -", field="type"
        )
    return task_type


# A worker's id, host and version are free text the worker chooses, shown in logs, in the
# CLI and on the dashboard. Control and format characters (newline, ESC, bidi overrides)
# and the Unicode line and paragraph separators would forge log lines or rewrite what an
# operator's terminal shows, so none of them is accepted.
# "Cs": a lone surrogate, what Python makes of bytes that are not UTF-8 in an argument or
# an environment variable; it cannot be sent (a worker id failed at start with a raw
# UnicodeEncodeError, a server id as the connections' application_name for half a minute).
UNPRINTABLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
MAX_WORKER_ID_LENGTH: Final = 200
MAX_WORKER_HOST_LENGTH: Final = 255
MAX_WORKER_VERSION_LENGTH: Final = 64


def first_unprintable(text: str) -> int | None:
    """The position of the first control, format or line-separator character, or None."""
    if text.isprintable():  # no character of the categories (nor any other non-printing)
        return None
    for index, char in enumerate(text):
        if unicodedata.category(char) in UNPRINTABLE_CATEGORIES:
            return index
    return None


def printable(text: str, replacement: str = "?") -> str:
    """`text` with each control, format or line-separator character replaced."""
    if first_unprintable(text) is None:
        return text
    return "".join(
        replacement if unicodedata.category(char) in UNPRINTABLE_CATEGORIES else char
        for char in text
    )


def check_printable(value: str, field: str) -> str:
    """Return `value`, or raise InvalidTask naming `field` and the first bad character."""
    index = first_unprintable(value)
    if index is not None:
        raise InvalidTask(
            f"{field} must not contain control or format characters (newline, escape, "
            f"bidi override...); it has U+{ord(value[index]):04X} at position {index}",
            field=field,
        )
    return value


def validate_worker_id(worker_id: str) -> str:
    """Return `worker_id` if a worker may go by it, else raise InvalidTask."""
    if not worker_id or len(worker_id) > MAX_WORKER_ID_LENGTH:
        raise InvalidTask(
            f"worker_id must be 1 to {MAX_WORKER_ID_LENGTH} characters", field="worker_id"
        )
    return check_printable(worker_id, "worker_id")


# The most any duration may be: 100 years, the longest wait that every timer a duration
# reaches still takes. gRPC makes a deadline absolute nanoseconds in an int64, which
# overflows in 2262: a call given 1e10 s failed at once with DEADLINE_EXCEEDED. A thread's
# join or lock wait takes at most threading.TIMEOUT_MAX (292 years here), and
# `Worker.stop(timeout=1e10)` raised OverflowError from its join. Whole days, so that the
# limit reads well and is exact in seconds.
LARGEST_DURATION: Final = timedelta(days=36_500)
_UNITS: Final = (("day", 86_400), ("hour", 3_600), ("minute", 60))
# Whole numbers of seconds below this are shown in full, larger ones in scientific notation.
_SHOWN_IN_FULL: Final = 10**15


def _seconds_text(seconds: float) -> str:
    """A number of seconds as given: whole ones in full unless huge, fractions as repr."""
    whole = isinstance(seconds, int) or seconds.is_integer()
    if whole and abs(seconds) < _SHOWN_IN_FULL:
        return f"{int(seconds)} s"
    # An int too large for a float formats through Decimal, which takes any int.
    return f"{Decimal(seconds):.3g} s" if isinstance(seconds, int) else f"{seconds!r} s"


def readable_duration(value: timedelta) -> str:
    """`value` as people write it: "7 days", "90 minutes", "2.5 s" (not "7 days, 0:00:00")."""
    seconds = value.total_seconds()
    for unit, size in _UNITS:
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}" + ("s" if count != 1 else "")
    return _seconds_text(seconds)


def utf8_text(text: str, what: str) -> str:
    """`text` if it can be sent (UTF-8); ConfigError naming `what` if not.

    Bytes that are not UTF-8 in an argument or environment variable reach Python as lone
    surrogates, which grpc, asyncpg and the resolver refused with tracebacks.
    """
    if not_utf8(text) is not None:
        raise ConfigError(f"{what} holds bytes that are not UTF-8 text")
    return text


def as_duration(
    value: object,
    name: str,
    error: Callable[[str], ConveyorError],
    *,
    maximum: timedelta = LARGEST_DURATION,
    zero_allowed: bool = False,
) -> timedelta:
    """Seconds (an int or a float) or a timedelta, as a positive timedelta up to `maximum`.

    Whatever else raises `error(message)`, never a ValueError or an OverflowError from
    `timedelta`: not a number, nan or an infinity, zero or less (less than zero if
    `zero_allowed`: a drain that may take no time), or more than `maximum`.
    A number is checked before it becomes a timedelta, whose constructor fails on nan
    (ValueError) and on anything past 999999999 days (OverflowError); an int is compared
    as it is, since a huge one does not convert to a float either.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        kind = type(value).__name__
        raise error(f"{name} must be a timedelta or a number of seconds, not {kind}")
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{name} must be a finite number of seconds, got {value}")
    if isinstance(value, timedelta):
        positive, too_long = value > _NO_TIME, value > maximum
    else:
        positive, too_long = value > 0, value > maximum.total_seconds()
    in_range = (positive or (zero_allowed and not value)) and not too_long
    delta = (
        value
        if isinstance(value, timedelta)
        else timedelta(seconds=value)
        if in_range
        else _NO_TIME
    )
    if in_range and (delta or zero_allowed):
        return delta  # the common case, with no message built for it
    shown = readable_duration(value) if isinstance(value, timedelta) else _seconds_text(value)
    if not positive and not zero_allowed:
        raise error(f"{name} must be positive, got {shown}")
    if not in_range and not too_long:
        raise error(f"{name} must not be negative, got {shown}")
    if too_long:
        limit = f"{readable_duration(maximum)} ({_seconds_text(maximum.total_seconds())})"
        raise error(f"{name} may be at most {limit}, got {shown}")
    # Positive, but rounded to 0 microseconds: no time at all.
    raise error(f"{name} must be at least a microsecond, got {shown}")


def _invalid_timeout(message: str) -> InvalidTask:
    return InvalidTask(message, field="timeout")


def validate_timeout(timeout: object) -> timedelta:
    """Coerce seconds or a timedelta to a positive timedelta up to 7 days, else InvalidTask."""
    return as_duration(timeout, "timeout", _invalid_timeout, maximum=MAX_TIMEOUT)


def validate_max_retries(max_retries: object) -> int:
    """Return `max_retries` if it is an integer in range, else raise InvalidTask."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int):
        raise InvalidTask("max_retries must be an integer", field="max_retries")
    if not 0 <= max_retries <= MAX_RETRIES_LIMIT:
        raise InvalidTask(
            f"max_retries must be between 0 and {MAX_RETRIES_LIMIT}, got {max_retries}",
            field="max_retries",
        )
    return max_retries


# Task types that passed validate_task_type in this process (bounded: types can be made up
# at run time, and a program that does so must not grow this without end).
_KNOWN_TYPES: set[str] = set()
_KNOWN_TYPES_LIMIT: Final = 1024


def known_task_type(task_type: object) -> str:
    """`validate_task_type`, remembered: a type that passed before passes with a set lookup.

    Producers build thousands of tasks a second and a server checks thousands of task
    specs a call, nearly all of a few types; the regular expression runs once per type.
    """
    if isinstance(task_type, str) and task_type in _KNOWN_TYPES:
        return task_type
    valid = validate_task_type(task_type)
    if len(_KNOWN_TYPES) >= _KNOWN_TYPES_LIMIT:
        _KNOWN_TYPES.clear()
    _KNOWN_TYPES.add(valid)
    return valid


@dataclass(frozen=True, slots=True)
class Task:
    """A unit of work to enqueue.

    Attributes:
        type: What kind of work; selects the handler. 1-128 characters of `[A-Za-z0-9_.:-]`.
        payload: Opaque bytes handed to the handler. The server never interprets them.
        timeout: Time allowed per attempt (a timedelta or seconds).
        max_retries: Attempts after the first one; a task runs at most `1 + max_retries` times.
        id: A UUID. Generated (UUIDv7) when absent; enqueueing the same id twice returns the
            existing task instead of creating a second one.
    """

    type: str
    payload: bytes = b""
    timeout: timedelta | float = DEFAULT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    id: str | None = None

    def __post_init__(self) -> None:
        """Validate every field, so a bad task fails before it is sent."""
        # Producers build thousands of tasks a second, nearly all of a type seen before,
        # with bytes and the default timeout: those pass with a set lookup and identity
        # checks (4.0 -> 2.6 us a task), and anything else takes the full validation.
        known_task_type(self.type)
        if type(self.payload) is not bytes:
            if not isinstance(self.payload, (bytes, bytearray, memoryview)):
                raise InvalidTask("payload must be bytes", field="payload")
            object.__setattr__(self, "payload", bytes(self.payload))
        if self.timeout is not DEFAULT_TIMEOUT:
            object.__setattr__(self, "timeout", validate_timeout(self.timeout))
        validate_max_retries(self.max_retries)
        if self.id is not None:
            object.__setattr__(self, "id", normalize_task_id(self.id))

    @property
    def timeout_delta(self) -> timedelta:
        """The timeout as a timedelta (always, after validation)."""
        assert isinstance(self.timeout, timedelta)  # noqa: S101 - normalised in __post_init__
        return self.timeout


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One row of a task's history: a state change or a notable moment of an attempt."""

    at: datetime
    event: str
    state: TaskState
    attempt: int
    worker_id: str | None
    detail: str | None
    # Who caused it, for events people cause (cancelled, retried); None for the system's.
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """A snapshot of a task as the server last stored it."""

    id: str
    type: str
    state: TaskState
    attempts: int
    max_retries: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_error: str | None
    worker_id: str | None
    result: bytes | None
    timeout: timedelta = DEFAULT_TIMEOUT
    available_at: datetime | None = None
    history: tuple[TaskEvent, ...] = field(default=())
    progress: str | None = None
    progress_at: datetime | None = None
    # Only when asked for (`get_task_status(payload=True)`).
    payload: bytes | None = None
    # Events left out of `history` between its first event and the rest: a history is read
    # bounded, its first event and the latest ones.
    history_omitted: int = 0
    # Only when asked (`get_task_status(explain=True)`): why the task is where it is, most
    # important first, read with the rest of this status so that the two agree.
    explanation: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TaskDetail:
    """A task with its history, payload and explanation: what the dashboard shows of it."""

    status: TaskStatus
    explanation: tuple[str, ...]
    paused: PausedType | None
    # `status.payload` holds only the payload's first bytes; this is its whole size.
    payload_size: int = 0
    # With events left out of `status.history`: the id to read the events before, a page
    # further back (`TaskControl.task_detail(before=...)`).
    older_history: int | None = None


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of a task listing, newest first.

    `next_page_token` is None on the last page; pass it back to get the next one.
    """

    tasks: tuple[TaskStatus, ...]
    next_page_token: str | None


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What a retry or cancel by ids or by filter did.

    With a filter and `dry_run`, `matched` is how many tasks the action would apply to and
    nothing changed. By ids, `changed_ids` lists those changed and `skipped` those left
    alone, with the state that made the action not apply (a succeeded task is not retried).
    """

    matched: int
    changed: int
    changed_ids: tuple[str, ...] = ()
    skipped: tuple[tuple[str, TaskState], ...] = ()
    # By filter: the point in the queue the count or the action covered up to. Pass a dry
    # run's `as_of` to the action so it covers the tasks that were counted, not newer ones.
    # A cursor, not part of the outcome: results with the same counts compare equal.
    as_of: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class PausedType:
    """A task type that is not being leased, since when and why."""

    type: str
    paused_at: datetime
    reason: str | None
    paused_by: str | None = None


@dataclass(frozen=True, slots=True)
class TypeStatus:
    """The live queue of one task type."""

    type: str
    queued: int
    running: int
    oldest_queued_seconds: float
    paused: bool


@dataclass(frozen=True, slots=True)
class OtherTypes:
    """The live queue of the types a status does not list one by one, summed.

    A status lists the types that most need attention (see `ClusterStatus`); `types` more
    have live tasks, `queued` and `running` of them, the oldest queued `oldest_queued_seconds`
    ago.
    """

    types: int = 0
    queued: int = 0
    running: int = 0
    oldest_queued_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """The numbers behind `/status`, as one server sampled them at `sampled_at`.

    `types` is bounded: it lists the types that most need attention (the oldest queued
    task first, then the most queued, then the most running; up to the server's bound, a
    thousand by default) and every paused type; `other_types` sums the rest. `queued` and
    `running` are the exact totals of both.
    """

    version: str
    server_id: str
    is_leader: bool
    leader_id: str | None
    leader_term: int
    sampled_at: datetime | None
    types: tuple[TypeStatus, ...]
    workers: dict[str, int]
    succeeded_last_minute: int
    failed_last_minute: int
    retried_last_minute: int
    started_last_minute: int
    paused_types: tuple[PausedType, ...]
    # What the *_last_minute counts cover: whole buckets of the history, 55 to 60 seconds.
    last_minute_seconds: float = 60.0
    other_types: OtherTypes = OtherTypes()

    @property
    def queued(self) -> int:
        """Queued tasks of every type, listed or not."""
        return sum(item.queued for item in self.types) + self.other_types.queued

    @property
    def running(self) -> int:
        """Running tasks of every type, listed or not."""
        return sum(item.running for item in self.types) + self.other_types.running

    @property
    def oldest_queued_seconds(self) -> float:
        """How long the oldest available queued task of any type has waited."""
        listed = (item.oldest_queued_seconds for item in self.types)
        return max([self.other_types.oldest_queued_seconds, *listed])


# A live worker whose event loop was blocked this long between two heartbeats is in trouble:
# the workers listing shows it first, with lost workers, and flags it.
BLOCKED_LOOP_MS: Final = 1000


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A registered worker as the server last heard of it.

    `state` is active, draining (stopping gracefully), lost (missed its heartbeats) or
    stopped. `loop_lag_ms` is the longest its event loop was blocked between its last two
    heartbeats: a large value means an async handler runs blocking code. `silent_for` is
    how long ago `last_heartbeat_at` was by the database's clock, when the listing was
    read (None from a server older than this field): the reader's own clock may be off.
    `in_flight` is the attempts its last heartbeat said were running; 0 once it is lost or
    stopped, since its leases ended then.
    """

    id: str
    host: str
    pid: int
    task_types: tuple[str, ...]
    concurrency: int
    version: str
    state: str
    started_at: datetime
    last_heartbeat_at: datetime
    in_flight: int
    loop_lag_ms: int
    silent_for: timedelta | None = None


@dataclass(frozen=True, slots=True)
class WorkerPage:
    """One page of the workers listing.

    Workers in trouble come first (lost, or an event loop blocked for `BLOCKED_LOOP_MS` or
    more), then the newest. `total` is how many workers the listing holds in all its pages,
    read with this page (None from a server older than it); `next_page_token` is None on
    the last page, else pass it back for the next one.
    """

    workers: tuple[WorkerInfo, ...]
    total: int | None
    next_page_token: str | None
