"""Typed access to the runtime queries in `queries.sql`: one function per named query.

The SQL text is parsed once at import. Functions take an asyncpg connection (or pool) and
keyword arguments, convert Python values at this edge (timedelta to seconds, str ids to
UUIDs), and return asyncpg records. Nothing else in Conveyor holds SQL.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, overload

import asyncpg

from conveyor.types import BLOCKED_LOOP_MS

if TYPE_CHECKING:
    from datetime import datetime

_NAME_LINE: Final = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _parse(text: str) -> dict[str, str]:
    parts = _NAME_LINE.split(text)
    # split() alternates: the preamble, then each name followed by its body.
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


SQL: Final[dict[str, str]] = _parse(
    resources.files("conveyor.storage").joinpath("queries.sql").read_text(encoding="utf-8")
)


@dataclass(frozen=True, slots=True)
class NewTask:
    """One row for `task_insert_many`; already validated by the caller."""

    id: str
    type: str
    payload: bytes
    timeout: timedelta
    max_retries: int
    # W3C trace context of the producer as a JSON object text, or None.
    trace_context: str | None = None


@dataclass(frozen=True, slots=True)
class NewTasks(Sequence[NewTask]):
    """Rows for `task_insert_many` as one sequence per field, all of the same length.

    What a bulk enqueue builds: the statement takes one array per field, and a thousand
    tasks then cost six lists instead of a thousand objects (which the garbage collector
    would also have to walk while they live). Reading it by index gives NewTask rows. Ids
    must be in canonical form (`normalize_task_id`): repeats within a batch are found by
    comparing them as text.
    """

    ids: Sequence[str]
    types: Sequence[str]
    payloads: Sequence[bytes]
    timeouts: Sequence[timedelta]
    max_retries: Sequence[int]
    trace_contexts: Sequence[str | None]

    @classmethod
    def of(cls, tasks: Sequence[NewTask]) -> NewTasks:
        """`tasks` as columns (returned as they are if they already are)."""
        if isinstance(tasks, NewTasks):
            return tasks
        return cls(
            [t.id for t in tasks],
            [t.type for t in tasks],
            [t.payload for t in tasks],
            [t.timeout for t in tasks],
            [t.max_retries for t in tasks],
            [t.trace_context for t in tasks],
        )

    @classmethod
    def concat(cls, batches: Sequence[Sequence[NewTask]]) -> NewTasks:
        """One batch with the rows of `batches`, in order (for a shared statement)."""
        if len(batches) == 1:
            return cls.of(batches[0])
        parts = [cls.of(batch) for batch in batches]
        return cls(
            [value for part in parts for value in part.ids],
            [value for part in parts for value in part.types],
            [value for part in parts for value in part.payloads],
            [value for part in parts for value in part.timeouts],
            [value for part in parts for value in part.max_retries],
            [value for part in parts for value in part.trace_contexts],
        )

    def __len__(self) -> int:
        """The number of tasks."""
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> NewTask: ...
    @overload
    def __getitem__(self, index: slice) -> NewTasks: ...
    def __getitem__(self, index: int | slice) -> NewTask | NewTasks:
        """One task, or a slice of the batch."""
        columns: tuple[Sequence[Any], ...] = (
            self.ids,
            self.types,
            self.payloads,
            self.timeouts,
            self.max_retries,
            self.trace_contexts,
        )
        if isinstance(index, slice):
            return NewTasks(*(column[index] for column in columns))
        return NewTask(*(column[index] for column in columns))


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry delay: `min(cap, base * 2**(attempt-1))`, then jittered to 50-100 % of that."""

    base: timedelta
    cap: timedelta


def _seconds(value: timedelta) -> float:
    return value.total_seconds()


def milliseconds(value: timedelta) -> int:
    """`value` as a PostgreSQL timeout setting's whole milliseconds.

    Zero means no limit to PostgreSQL, so a positive duration shorter than a millisecond
    rounds up to 1 rather than down to none.
    """
    if value <= timedelta(0):
        return 0
    return max(1, round(value.total_seconds() * 1000))


def _uuids(values: Sequence[str]) -> list[uuid.UUID]:
    return [uuid.UUID(v) for v in values]


# The keyset of a first page: every seq is below it.
FIRST_PAGE: Final = 2**63 - 1


def _one_or_each(values: Sequence[Any]) -> Sequence[Any]:
    """`values`, or just its first element when every element equals it (see queries.sql)."""
    return values[:1] if values.count(values[0]) == len(values) else values


def _insert_arguments(batch: NewTasks) -> tuple[Sequence[Any], ...]:
    """The six arrays of `task_insert_many` and `task_insert_skipping_taken`."""
    return (
        batch.ids,  # canonical UUID text: asyncpg encodes it without a uuid.UUID per id
        _one_or_each(batch.types),
        _one_or_each(batch.payloads),
        [timeout.total_seconds() for timeout in _one_or_each(batch.timeouts)],
        _one_or_each(batch.max_retries),
        _one_or_each(batch.trace_contexts),
    )


# Batches at least this large first try the insert that assumes every id is new. Small ones
# (single enqueues, often repeating an id on purpose) go straight to the statement that
# skips taken ids: the saving is per task, and a failed attempt costs a round trip and an
# error in PostgreSQL's log.
NEW_IDS_FIRST_FROM: Final = 64


async def task_insert_many(conn: Any, tasks: Sequence[NewTask]) -> list[bool]:
    """Insert tasks in one statement, in order; idempotent per id.

    Returns, for each task in order, whether this call created it (False: the id was
    already taken, or repeats an earlier task of the same batch).

    A large batch of distinct ids, outside a transaction, first runs `task_insert_many`,
    which assumes every id is new; if one is taken (a repeated call, or a race with another
    call for the same id) that statement inserts nothing, and `task_insert_skipping_taken`
    runs instead. Either way one statement commits the whole batch.
    """
    if not tasks:
        return []
    batch = NewTasks.of(tasks)
    distinct = len(set(batch.ids)) == len(batch)
    # Inside a caller's transaction a failed attempt would abort that transaction too.
    if distinct and len(batch) >= NEW_IDS_FIRST_FROM and not conn.is_in_transaction():
        try:
            await conn.fetchval(SQL["task_insert_many"], *_insert_arguments(batch))
        except asyncpg.UniqueViolationError:
            pass  # an id is taken: the statement inserted nothing
        else:
            return [True] * len(batch)
    return await _insert_skipping_taken(conn, batch, distinct=distinct)


async def task_insert_skipping_taken(conn: Any, tasks: Sequence[NewTask]) -> list[bool]:
    """Insert tasks in one statement, in order, skipping ids already taken.

    Returns, for each task in order, whether this statement created it (False: the id was
    already taken, or repeats an earlier task of the same batch).
    """
    if not tasks:
        return []
    batch = NewTasks.of(tasks)
    return await _insert_skipping_taken(conn, batch, distinct=len(set(batch.ids)) == len(batch))


async def task_insert_one(conn: Any, task: NewTask) -> bool:
    """Insert one task, idempotent per id; whether this statement created it."""
    created: bool = await conn.fetchval(
        SQL["task_insert_one"],
        task.id,
        task.type,
        task.payload,
        task.timeout.total_seconds(),
        task.max_retries,
        task.trace_context,
    )
    return created


async def _insert_skipping_taken(conn: Any, batch: NewTasks, *, distinct: bool) -> list[bool]:
    if len(batch) == 1:
        # The common case of one task at a time gets a statement without arrays.
        return [await task_insert_one(conn, batch[0])]
    row = await conn.fetchrow(SQL["task_insert_skipping_taken"], *_insert_arguments(batch))
    created = [True] * len(batch)
    for position in row["skipped"]:
        created[position - 1] = False
    if not distinct:
        # A repeated id: only its first occurrence can have been created by this statement.
        seen: set[str] = set()
        for index, task_id in enumerate(batch.ids):
            if task_id in seen:
                created[index] = False
            seen.add(task_id)
    return created


async def task_insert_leasing(
    conn: Any,
    batch: NewTasks,
    *,
    offered_to: Sequence[str | None],
    lease_ids: Sequence[str | None],
    lease_ttl: timedelta,
    deadline_grace: timedelta,
) -> list[asyncpg.Record]:
    """Insert `batch` like `task_insert_skipping_taken`, leasing offered tasks at once.

    `offered_to` names, per task, the worker waiting for it (None: no one), and
    `lease_ids` the lease id it gets if it is leased. Returns one row per task in order:
    `created`, `leased`, and for a leased task the columns `task_claim` returns. A
    repeated id reads as created (and leased) at each of its positions; only the first can
    be.
    """
    return list(
        await conn.fetch(
            SQL["task_insert_leasing"],
            *_insert_arguments(batch),
            list(offered_to),
            _seconds(lease_ttl),
            _seconds(deadline_grace),
            list(lease_ids),
        )
    )


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim statement leased.

    `held`: it leased nothing, though a task of its types was ready: another claim had the
    ready ones locked, and they may be free again within milliseconds.
    """

    rows: list[asyncpg.Record]
    held: bool = False


async def task_claim(
    conn: Any,
    *,
    task_types: Sequence[str],
    limit: int,
    worker_id: str,
    lease_ttl: timedelta,
    deadline_grace: timedelta,
    max_bytes: int | None = None,
    bytes_per_lease: int = 0,
) -> Claim:
    """Lease up to `limit` of the oldest available tasks of the given types.

    With `max_bytes`, only as many of them as fit that many bytes, each counted as its
    payload, its trace context's JSON text and `bytes_per_lease`; the oldest always. Each
    row's `more` says whether tasks were left for want of room.
    """
    rows = await conn.fetch(
        SQL["task_claim"],
        list(task_types),
        limit,
        worker_id,
        _seconds(lease_ttl),
        _seconds(deadline_grace),
        max_bytes,
        bytes_per_lease,
    )
    if len(rows) == 1 and rows[0]["held"]:
        return Claim([], held=True)
    return Claim(list(rows))


async def task_succeed(
    conn: Any, *, task_id: str, lease_id: str, worker_id: str, result: bytes | None
) -> asyncpg.Record | None:
    """Finish the attempt `worker_id` holds as succeeded. None: the lease is not current."""
    row: asyncpg.Record | None = await conn.fetchrow(
        SQL["task_succeed"], uuid.UUID(task_id), uuid.UUID(lease_id), result, worker_id
    )
    return row


async def task_fail(
    conn: Any,
    *,
    task_id: str,
    lease_id: str,
    worker_id: str,
    error: str,
    event: str,
    retryable: bool,
    backoff: Backoff,
) -> asyncpg.Record | None:
    """Fail the attempt holding `lease_id`; queue a retry if allowed. None: lease not current."""
    row: asyncpg.Record | None = await conn.fetchrow(
        SQL["task_fail"],
        uuid.UUID(task_id),
        uuid.UUID(lease_id),
        error,
        event,
        retryable,
        _seconds(backoff.base),
        _seconds(backoff.cap),
        worker_id,
    )
    return row


async def task_release(
    conn: Any,
    *,
    task_id: str,
    lease_id: str,
    worker_id: str,
    reason: str,
    delivered: bool,
    max_releases: int,
) -> asyncpg.Record | None:
    """Hand a lease back without spending its attempt. None: the lease is not current.

    `delivered`: the lease reached its worker (false: the server hands back a lease it
    could not deliver, and the task keeps its place in time; see the SQL). The
    `max_releases`th release since the task's last operator retry fails it (state failed).
    """
    row: asyncpg.Record | None = await conn.fetchrow(
        SQL["task_release"],
        uuid.UUID(task_id),
        uuid.UUID(lease_id),
        reason,
        worker_id,
        delivered,
        max_releases,
    )
    return row


def attempt_outcome(state: str, otherwise: str) -> str:
    """What became of an attempt, as the outcome metrics name it.

    From the task's state after the statement that ended the attempt (task_fail,
    task_release, task_reap_expired): `failed` when that statement failed the task for
    good, else `otherwise` (`retried`, `released`).
    """
    return "failed" if state == "failed" else otherwise


async def task_lock_for_cancel(conn: Any, *, task_id: str) -> asyncpg.Record | None:
    """Lock a task row for the rest of the transaction. None: no such task."""
    row: asyncpg.Record | None = await conn.fetchrow(
        SQL["task_lock_for_cancel"], uuid.UUID(task_id)
    )
    return row


async def task_cancel(
    conn: Any, *, task_id: str, detail: str, actor: str | None = None
) -> asyncpg.Record | None:
    """Cancel a live task; `actor` is who asked. None: it was not live."""
    row: asyncpg.Record | None = await conn.fetchrow(
        SQL["task_cancel"], uuid.UUID(task_id), detail, actor
    )
    return row


async def task_lease_extend(
    conn: Any,
    *,
    worker_id: str,
    leases: Sequence[tuple[str, str, str | None]],
    lease_ttl: timedelta,
    deadline_grace: timedelta,
) -> list[asyncpg.Record]:
    """Extend the current leases `worker_id` holds (task_id, lease_id, progress or None).

    The ids must be canonical (`normalize_task_id`): asyncpg parses them in C, and more
    strictly than `uuid.UUID`, which would cost more than the rest of the call.

    Returns (task_id, lease_id, state, busy) of the named leases not extended: lost
    (`busy` false), or left alone this time because another transaction holds the task's
    row (`busy` true).
    """
    return list(
        await conn.fetch(
            SQL["task_lease_extend"],
            [task_id for task_id, _, _ in leases],
            [lease_id for _, lease_id, _ in leases],
            _seconds(lease_ttl),
            _seconds(deadline_grace),
            [progress for _, _, progress in leases],
            worker_id,
        )
    )


@dataclass(frozen=True, slots=True)
class LeaderProof:
    """The (holder, term) a leader-only statement must still hold to write anything.

    `statement_timeout`: how long one leader-only statement may run. Each holds the leader
    row FOR SHARE (the fence) until it ends, and the elections and renewals of every server
    wait for that lock: a statement slower than the leader's TTL would let the role lapse
    with no server able to take it, and stop all maintenance until it ended. The elector
    sets a third of the TTL (its renewal interval); None leaves the server's timeout.
    """

    holder: str
    term: int
    statement_timeout: timedelta | None = None


class LeaderStatementGaveUp(Exception):
    """A leader-only statement ran out of its budget (`LeaderProof.statement_timeout`).

    Not the database's unavailability: it answered, and the statement chose to stop (stuck
    behind a lock, or slow), so the database breaker does not count it and the duty's next
    round tries again.
    """


async def statement_timeout_set_local(conn: Any, *, budget: timedelta) -> None:
    """Within a transaction: its statements may run `budget`, and it may sit idle as long.

    The statements' budget is never longer than the session's own statement timeout.
    """
    await conn.fetchval(
        SQL["statement_timeout_set_local"], max(1, int(budget.total_seconds() * 1000))
    )


async def _fenced(conn: Any, method: str, leader: LeaderProof, sql: str, *args: Any) -> Any:
    """Run the leader-only statement `sql` (by `conn.<method>`) within the leader's budget."""
    budget = leader.statement_timeout
    if budget is None:
        return await getattr(conn, method)(sql, *args)
    try:
        async with conn.transaction():
            await statement_timeout_set_local(conn, budget=budget)
            return await getattr(conn, method)(sql, *args)
    except asyncpg.QueryCanceledError as exc:
        raise LeaderStatementGaveUp(
            f"a leader-only statement gave up within its budget of {budget.total_seconds():g}s "
            f"(it holds the leader row the elections wait for): {exc}"
        ) from exc


async def task_reap_expired(
    conn: Any, *, limit: int, backoff: Backoff, leader: LeaderProof
) -> list[asyncpg.Record]:
    """Leader only: schedule up to `limit` tasks with expired leases for a retry (or fail them)."""
    return list(
        await _fenced(
            conn,
            "fetch",
            leader,
            SQL["task_reap_expired"],
            limit,
            _seconds(backoff.base),
            _seconds(backoff.cap),
            leader.holder,
            leader.term,
        )
    )


async def task_promote_due(conn: Any, *, limit: int) -> int:
    """Move up to `limit` due scheduled tasks into the queue (NOTIFY if any); how many."""
    promoted: int = await conn.fetchval(SQL["task_promote_due"], limit)
    return promoted


async def task_get(conn: Any, *, task_id: str) -> asyncpg.Record | None:
    """One task by id."""
    row: asyncpg.Record | None = await conn.fetchrow(SQL["task_get"], uuid.UUID(task_id))
    return row


async def task_event_list(
    conn: Any, *, task_id: str, limit: int, max_bytes: int, before: int | None = None
) -> list[asyncpg.Record]:
    """A task's first event and its latest (before the event `before`), oldest first.

    At most `limit` latest events, within about `max_bytes` of text (the latest one always).
    Each row has the event's `id` and the `total` number of the task's events.
    """
    return list(
        await conn.fetch(SQL["task_event_list"], uuid.UUID(task_id), limit, max_bytes, before)
    )


async def task_ready_notify(conn: Any) -> None:
    """Wake every server's long polls."""
    await conn.execute(SQL["task_ready_notify"])


async def database_ping(conn: Any, *, timeout: float | None = None) -> None:
    """A trivial round trip: raises if the connection is unusable."""
    await conn.fetchval(SQL["database_ping"], timeout=timeout)


async def session_configure(
    conn: Any, *, statement_timeout: timedelta, idle_in_transaction_timeout: timedelta
) -> int:
    """Set the session's timeouts (zero: none), clear its role's lock_timeout; its pid."""
    pid: int = await conn.fetchval(
        SQL["session_configure"],
        f"{milliseconds(statement_timeout)}ms",
        f"{milliseconds(idle_in_transaction_timeout)}ms",
    )
    return pid


async def session_read_only(conn: Any) -> bool:
    """Whether this session can write nothing (a standby, default_transaction_read_only)."""
    read_only: bool = await conn.fetchval(SQL["session_read_only"])
    return read_only


async def session_mark(conn: Any, *, marker: str) -> None:
    """Leave `marker` in the session, for `session_marked` to find."""
    await conn.fetchval(SQL["session_mark"], marker)


async def session_marked(conn: Any) -> tuple[str | None, int]:
    """The session's marker (None: this session never set one), and its backend's pid."""
    row = await conn.fetchrow(SQL["session_marked"])
    return row["marker"] or None, row["pid"]


async def session_backend_pid(conn: Any) -> int:
    """The pid of the PostgreSQL backend this statement runs on."""
    pid: int = await conn.fetchval(SQL["session_backend_pid"])
    return pid


async def task_explain(conn: Any, *, task_id: str, live_within: timedelta) -> asyncpg.Record | None:
    """Everything needed to explain where a task is and why (None: no such task)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        SQL["task_explain"], uuid.UUID(task_id), _seconds(live_within)
    )
    return row


async def task_live_stats(
    conn: Any, *, named: int, also: Collection[str] = ()
) -> list[asyncpg.Record]:
    """Per type: queued, running, oldest available queued age (s), `types` (1).

    Only the `named` most pressing types, the paused ones and those in `also`; one more
    row, of type None, sums all the others (`types` of them), if there are any.
    """
    return list(await conn.fetch(SQL["task_live_stats"], named, list(also)))


async def worker_register(
    conn: Any,
    *,
    worker_id: str,
    host: str,
    pid: int,
    task_types: Sequence[str],
    concurrency: int,
    version: str,
    principal: str | None,
    gone_after: timedelta,
    lease_ttl: timedelta,
) -> bool:
    """Insert or refresh a worker as active; False if the id belongs to another principal.

    `gone_after` and `lease_ttl`: the silence after which this server deems the worker lost
    and the lease length it tells the worker; kept with the worker, every server leases to
    it and sweeps it by them at least (migration 0016).
    """
    row = await conn.fetchrow(
        SQL["worker_register"],
        worker_id,
        host,
        pid,
        list(task_types),
        concurrency,
        version,
        principal,
        _seconds(gone_after),
        _seconds(lease_ttl),
    )
    return row is not None


async def worker_principal(conn: Any, *, worker_id: str) -> tuple[bool, str | None]:
    """(registered, principal) of a worker id; the principal is None if auth was off."""
    row = await conn.fetchrow(SQL["worker_principal"], worker_id)
    return (row is not None, row["principal"] if row is not None else None)


@dataclass(frozen=True, slots=True)
class Touched:
    """What a heartbeat's worker_touch learned: whether the worker is known, and its lease."""

    known: bool
    lease_ttl: timedelta | None


async def worker_touch(
    conn: Any, *, worker_id: str, draining: bool, in_flight: int, loop_lag_ms: int
) -> Touched:
    """Record a heartbeat and what the worker says about itself."""
    row = await conn.fetchrow(SQL["worker_touch"], worker_id, draining, in_flight, loop_lag_ms)
    return Touched(row is not None, row["lease_ttl"] if row is not None else None)


async def worker_lease_ttl(conn: Any, *, worker_id: str) -> timedelta | None:
    """The lease length the worker registered with; None if unknown or not recorded."""
    ttl: timedelta | None = await conn.fetchval(SQL["worker_lease_ttl"], worker_id)
    return ttl


async def worker_set_state(conn: Any, *, worker_id: str, state: str) -> None:
    """Set a worker's state (draining, stopped)."""
    await conn.execute(SQL["worker_set_state"], worker_id, state)


async def worker_sweep_lost(
    conn: Any, *, silence: timedelta, leader: LeaderProof, reachable_for: timedelta
) -> list[asyncpg.Record]:
    """Leader only: mark silent workers lost and end their leases; (id, silent_for, leases) each.

    `reachable_for`: how long the leader has reached the database without a failure; a
    worker's silence counts only within it.
    """
    return list(
        await _fenced(
            conn,
            "fetch",
            leader,
            SQL["worker_sweep_lost"],
            _seconds(silence),
            leader.holder,
            leader.term,
            _seconds(reachable_for),
        )
    )


async def worker_prune_gone(
    conn: Any, *, retention: timedelta, limit: int, leader: LeaderProof
) -> dict[str, int]:
    """Leader only: delete up to `limit` gone workers silent longer than `retention`.

    Gone: stopped or lost. Returns how many of each state were deleted.
    """
    rows = await _fenced(
        conn,
        "fetch",
        leader,
        SQL["worker_prune_gone"],
        _seconds(retention),
        limit,
        leader.holder,
        leader.term,
    )
    pruned: dict[str, int] = {}
    for row in rows:
        pruned[row["state"]] = pruned.get(row["state"], 0) + 1
    return pruned


@dataclass(frozen=True, slots=True)
class WorkerListPosition:
    """Where a page of `worker_list` ended: its last worker's sort key."""

    troubled: bool
    started_at: datetime
    id: str


async def worker_list(
    conn: Any,
    *,
    include_stopped: bool,
    limit: int,
    after: WorkerListPosition | None = None,
    blocked_loop_ms: int = BLOCKED_LOOP_MS,
) -> list[asyncpg.Record]:
    """Workers in trouble first, then newest first, after `after`; stopped ones if asked."""
    return list(
        await conn.fetch(
            SQL["worker_list"],
            include_stopped,
            limit,
            blocked_loop_ms,
            after.troubled if after is not None else None,
            after.started_at if after is not None else None,
            after.id if after is not None else None,
        )
    )


async def worker_list_count(conn: Any, *, include_stopped: bool) -> int:
    """How many workers `worker_list` lists in all its pages."""
    count: int = await conn.fetchval(SQL["worker_list_count"], include_stopped)
    return count


async def leader_attempt_elect(
    conn: Any, *, name: str, holder: str, ttl: timedelta, term: int | None
) -> asyncpg.Record | None:
    """Take the role, or renew it in `term`; the row (term, expires_at) if `holder` leads."""
    row: asyncpg.Record | None = await conn.fetchrow(
        SQL["leader_attempt_elect"], name, holder, _seconds(ttl), term
    )
    return row


async def leader_resign(conn: Any, *, name: str, holder: str, term: int) -> None:
    """Give the role up now (if `holder` holds it in `term`) and wake the other servers."""
    await conn.execute(SQL["leader_resign"], name, holder, term)


async def leader_get(conn: Any, *, name: str) -> asyncpg.Record | None:
    """The role's current row."""
    row: asyncpg.Record | None = await conn.fetchrow(SQL["leader_get"], name)
    return row


async def worker_count_by_state(conn: Any) -> dict[str, int]:
    """Number of workers in each state."""
    rows = await conn.fetch(SQL["worker_count_by_state"])
    return {row["state"]: row["workers"] for row in rows}


def _stored_states(states: Sequence[str]) -> list[str]:
    """The states as stored: `queued` is also `scheduled`, a queued task in retry backoff.

    The public QUEUED covers both (migration 0015); only the claim tells them apart.
    """
    stored = list(states)
    if "queued" in stored and "scheduled" not in stored:
        stored.append("scheduled")
    return stored


async def task_list_by_state(
    conn: Any, *, states: Sequence[str], before_seq: int, limit: int
) -> list[asyncpg.Record]:
    """Tasks in `states` with seq below `before_seq`, newest first."""
    return list(
        await conn.fetch(SQL["task_list_by_state"], _stored_states(states), before_seq, limit)
    )


async def task_list_by_type_and_state(
    conn: Any, *, states: Sequence[str], task_type: str, before_seq: int, limit: int
) -> list[asyncpg.Record]:
    """Tasks of `task_type` in `states` with seq below `before_seq`, newest first."""
    return list(
        await conn.fetch(
            SQL["task_list_by_type_and_state"], _stored_states(states), before_seq, limit, task_type
        )
    )


async def task_count_by_state(conn: Any, *, states: Sequence[str]) -> int:
    """How many tasks are in `states`."""
    count: int = await conn.fetchval(SQL["task_count_by_state"], _stored_states(states))
    return count


async def task_count_by_type_and_state(conn: Any, *, states: Sequence[str], task_type: str) -> int:
    """How many tasks of `task_type` are in `states`."""
    count: int = await conn.fetchval(
        SQL["task_count_by_type_and_state"], _stored_states(states), task_type
    )
    return count


async def task_states_get(conn: Any, *, task_ids: Sequence[str]) -> dict[str, str]:
    """The state of each of `task_ids` that exists, by id."""
    rows = await conn.fetch(SQL["task_states_get"], _uuids(task_ids))
    return {str(row["id"]): row["state"] for row in rows}


async def task_briefs_get(conn: Any, *, task_ids: Sequence[str]) -> dict[str, asyncpg.Record]:
    """Each of `task_ids` that exists, by id: why reports naming it were not applied."""
    rows = await conn.fetch(SQL["task_briefs_get"], _uuids(task_ids))
    return {str(row["id"]): row for row in rows}


async def task_retry_many(
    conn: Any,
    *,
    task_ids: Sequence[str],
    detail: str,
    states: Sequence[str],
    actor: str | None = None,
) -> list[asyncpg.Record]:
    """Re-queue the tasks among `task_ids` in `states`; returns (id, type) of each."""
    return list(
        await conn.fetch(
            SQL["task_retry_many"], _uuids(task_ids), detail, _stored_states(states), actor
        )
    )


async def task_cancel_many(
    conn: Any,
    *,
    task_ids: Sequence[str],
    detail: str,
    states: Sequence[str],
    actor: str | None = None,
) -> list[asyncpg.Record]:
    """Cancel the tasks among `task_ids` in `states`; returns (id, type) of each."""
    return list(
        await conn.fetch(
            SQL["task_cancel_many"], _uuids(task_ids), detail, _stored_states(states), actor
        )
    )


async def task_seq_last(conn: Any) -> int:
    """The highest queue position handed out so far (0 before the first task)."""
    last: int = await conn.fetchval(SQL["task_seq_last"])
    return last


async def task_list_oldest_by_state(
    conn: Any, *, states: Sequence[str], after_seq: int, through_seq: int, limit: int
) -> list[asyncpg.Record]:
    """(id, seq) of tasks in `states` with after_seq < seq <= through_seq, oldest first."""
    return list(
        await conn.fetch(
            SQL["task_list_oldest_by_state"], _stored_states(states), after_seq, through_seq, limit
        )
    )


async def task_list_oldest_by_type_and_state(
    conn: Any,
    *,
    states: Sequence[str],
    task_type: str,
    after_seq: int,
    through_seq: int,
    limit: int,
) -> list[asyncpg.Record]:
    """(id, seq) of tasks of `task_type` in `states` in the seq range, oldest first."""
    return list(
        await conn.fetch(
            SQL["task_list_oldest_by_type_and_state"],
            _stored_states(states),
            after_seq,
            through_seq,
            limit,
            task_type,
        )
    )


async def task_payload_get(conn: Any, *, task_id: str) -> bytes | None:
    """A task's payload (None: no such task)."""
    payload: bytes | None = await conn.fetchval(SQL["task_payload_get"], uuid.UUID(task_id))
    return payload


async def paused_type_set(
    conn: Any, *, task_type: str, reason: str | None, actor: str = "anonymous"
) -> bool:
    """Pause a type (and audit it); False if it already was."""
    paused_at = await conn.fetchval(SQL["paused_type_set"], task_type, reason, actor)
    return paused_at is not None


async def paused_type_clear(conn: Any, *, task_type: str, actor: str = "anonymous") -> bool:
    """Resume a type (audit it, wake long polls); False if it was not paused."""
    rows = await conn.fetch(SQL["paused_type_clear"], task_type, actor)
    return bool(rows)


async def audit_log_add(
    conn: Any, *, actor: str, action: str, target: str, detail: str | None
) -> None:
    """Record an action of a person on no single task (a dashboard login)."""
    await conn.execute(SQL["audit_log_add"], actor, action, target, detail)


async def audit_log_list(conn: Any, *, limit: int) -> list[asyncpg.Record]:
    """The latest operator actions on no single task (pause, resume), newest first."""
    return list(await conn.fetch(SQL["audit_log_list"], limit))


async def paused_type_list(conn: Any) -> list[asyncpg.Record]:
    """Paused types with when and why, by name."""
    return list(await conn.fetch(SQL["paused_type_list"]))


async def task_event_buckets(
    conn: Any, *, since: datetime, width: timedelta
) -> list[asyncpg.Record]:
    """Outcome counts per `width` bucket of the history since `since`, oldest first."""
    return list(await conn.fetch(SQL["task_event_buckets"], since, _seconds(width)))


async def database_now(conn: Any) -> datetime:
    """The database's clock: the one every event's `at` comes from."""
    now: datetime = await conn.fetchval(SQL["database_now"])
    return now


async def task_payload_head(conn: Any, *, task_id: str, length: int) -> asyncpg.Record | None:
    """(head, size): a payload's first `length` bytes and its whole size (None: no task)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        SQL["task_payload_head"], uuid.UUID(task_id), length
    )
    return row


# The final states in the order task_prune_finished walks them (its $6 array).
PRUNED_STATES: Final = ("succeeded", "failed", "cancelled")


# How many of each final state's tasks one task_prune_finished batch may read, in batches
# (its $7 is this times its size): enough that a stretch of mostly old tasks still fills a
# batch, few enough that a batch among millions of young ones is a few milliseconds.
PRUNE_READ_BATCHES: Final = 10


@dataclass(frozen=True, slots=True)
class PruneBatch:
    """What one task_prune_finished batch did: tasks deleted, and where each walk reached.

    Both by final state; the round's next batch goes on after `reached`. `more`: a walk
    stopped at the batch's read limit with tasks after it, so there is more to do even if
    the batch deleted fewer than a batch (the young tasks it read and skipped).
    """

    pruned: dict[str, int]
    reached: dict[str, int]
    more: bool = False


async def task_prune_finished(
    conn: Any,
    *,
    retention: timedelta,
    limit: int,
    leader: LeaderProof,
    mark_slack: timedelta = timedelta(minutes=5),
    after: PruneBatch | None = None,
    read_limit: int | None = None,
) -> PruneBatch:
    """Leader only: delete up to `limit` tasks finished longer ago than `retention`.

    `mark_slack`: how old (past the cutoff) the newest mark may be and still bound the walk;
    a few rounds of marks (see the statement). `after`: the walk's previous batch, which
    this one goes on from (None to start from the beginning). `read_limit`: how many tasks of
    each final state the batch may read (None: `PRUNE_READ_BATCHES` times `limit`); at
    least `limit`, or ValueError.
    """
    if read_limit is None:
        read_limit = PRUNE_READ_BATCHES * limit
    if limit < 1 or read_limit < limit:
        raise ValueError(
            f"a prune batch needs a size of at least 1 and a read limit of at least its size "
            f"(got {limit} and {read_limit})"
        )
    rows = await _fenced(
        conn,
        "fetch",
        leader,
        SQL["task_prune_finished"],
        _seconds(retention),
        limit,
        leader.holder,
        leader.term,
        _seconds(mark_slack),
        [after.reached.get(state, 0) if after is not None else 0 for state in PRUNED_STATES],
        read_limit,
    )
    return PruneBatch(
        pruned={row["state"]: row["deleted"] for row in rows if row["deleted"]},
        reached={row["state"]: row["reached"] for row in rows},
        more=any(row["more"] for row in rows),
    )


async def seq_mark_record(
    conn: Any, *, retention: timedelta, leader: LeaderProof, spacing: timedelta
) -> None:
    """Leader only: mark where the queue order stands now, for task_prune_finished.

    No mark when the newest is younger than `spacing`.
    """
    await _fenced(
        conn,
        "execute",
        leader,
        SQL["seq_mark_record"],
        _seconds(retention),
        leader.holder,
        leader.term,
        _seconds(spacing),
    )


@dataclass(frozen=True, slots=True)
class Success:
    """One success report for `task_succeed_many`."""

    task_id: str
    lease_id: str
    worker_id: str
    result: bytes | None


async def task_succeed_many(conn: Any, reports: Sequence[Success]) -> list[asyncpg.Record]:
    """Apply success reports in one statement; one (task_id, applied, busy, ...) per report.

    `busy`: not applied because another transaction holds the task's row; apply it alone.

    The ids must be canonical (`normalize_task_id`), as for `task_lease_extend`.
    """
    return list(
        await conn.fetch(
            SQL["task_succeed_many"],
            [r.task_id for r in reports],
            [r.lease_id for r in reports],
            [r.result if r.result is not None else b"" for r in reports],
            [r.result is not None for r in reports],
            [r.worker_id for r in reports],
        )
    )


async def task_table_changes(conn: Any) -> asyncpg.Record:
    """(changed, analyzed_rows) of conveyor_tasks since its statistics were last gathered."""
    row: asyncpg.Record = await conn.fetchrow(SQL["task_table_changes"])
    return row


# SQLSTATE lock_not_available: what PostgreSQL's warning carries when ANALYZE (SKIP_LOCKED)
# skips a table another session holds (autovacuum, a VACUUM, CREATE INDEX CONCURRENTLY).
LOCK_NOT_AVAILABLE: Final = "55P03"


@dataclass(frozen=True, slots=True)
class AnalyzeSkipped:
    """PostgreSQL's warning for an ANALYZE that skipped the table and gathered nothing."""

    sqlstate: str
    message: str

    @property
    def locked(self) -> bool:
        """Skipped for a lock another session held: a moment later it may go through."""
        return self.sqlstate == LOCK_NOT_AVAILABLE


async def task_table_analyze(conn: Any) -> AnalyzeSkipped | None:
    """Gather conveyor_tasks' planner statistics now; None if it did, else why it did not.

    `ANALYZE (SKIP_LOCKED)` that cannot lock the table (autovacuum holds it), or may not
    analyze it (the role does not own it), succeeds all the same, having done nothing: it
    says so only with a WARNING. So the warnings of this one statement are collected as
    they arrive, in band, before its completion (asyncpg schedules a log listener when it
    reads the notice, ahead of waking this coroutine with the result, which follows the
    notice on the wire). Reading `pg_stat_user_tables.last_analyze` afterwards instead
    would depend on the statistics system: before PostgreSQL 15 the collector publishes
    it up to half a second later (or drops it), and an autovacuum ANALYZE finishing
    meanwhile would be mistaken for this one.
    """
    warnings: list[AnalyzeSkipped] = []

    def collect(_conn: Any, message: Any) -> None:
        # severity_en: never translated (lc_messages), unlike severity.
        if message.severity_en == "WARNING":
            warnings.append(AnalyzeSkipped(str(message.sqlstate), str(message.message)))

    conn.add_log_listener(collect)
    try:
        await conn.execute(SQL["task_table_analyze"])
    finally:
        conn.remove_log_listener(collect)
    return warnings[0] if warnings else None
