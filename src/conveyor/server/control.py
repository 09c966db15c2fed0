"""TaskControl: what operators do to tasks and types, shared by AdminService and the dashboard.

Listing (newest first, keyset-paged by queue order, filtered by state and type), a task's
full detail, retry and cancel by ids or by filter, pause and resume of a type. Every action
is a set-based statement that writes its history rows itself, so a bulk action of 100,000
tasks is a few hundred statements of `BULK_BATCH` tasks each, each its own short
transaction: no long lock, and an interrupted bulk action leaves every task either done or
untouched. The gRPC and HTTP layers only translate; the rules live here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import InvalidTask, TaskNotFound
from conveyor.server.rpc import outliving_the_call
from conveyor.server.task_service import HISTORY_BYTES, status_from_row
from conveyor.storage import queries
from conveyor.types import (
    BulkResult,
    PausedType,
    TaskDetail,
    TaskPage,
    TaskState,
    normalize_task_id,
    validate_task_type,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    import asyncpg

    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.database import Database
    from conveyor.server.explanation import Explainer
    from conveyor.server.notifier import TaskNotifier

log = logging.getLogger("conveyor.server.control")

DEFAULT_PAGE: Final = 50
MAX_PAGE: Final = 1000
MAX_IDS: Final = 1000
# Tasks per statement of a bulk action by filter: large enough to be fast, small enough
# that each transaction's locks are brief.
BULK_BATCH: Final = 500
# Longest one bulk call keeps working before it returns its cursor (well inside the
# clients' 10 s call deadline, so a large action is many short calls, never a timeout).
BULK_CALL_BUDGET: Final = 2.0
MAX_REASON: Final = 1000
# Of a payload, the dashboard shows this much (and its size).
PAYLOAD_PREVIEW_BYTES: Final = 2000
# Of a history, the dashboard shows the first event and a page of the latest ones (within
# GetTask's byte budget): a history has no end of its own, a page must.
HISTORY_PAGE: Final = 100
# Queue positions are PostgreSQL bigints; the wire's uint64 reaches twice as far.
MAX_QUEUE_POSITION: Final = 2**63 - 1
# History event ids are PostgreSQL bigints too.
MAX_EVENT_ID: Final = 2**63 - 1

RETRYABLE: Final = (TaskState.FAILED, TaskState.CANCELLED)
CANCELLABLE: Final = (TaskState.QUEUED, TaskState.RUNNING)
ALL_STATES: Final = tuple(TaskState)


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks a listing or bulk action covers. Empty `states`: every state it allows."""

    states: tuple[TaskState, ...] = ()
    task_type: str | None = None


@dataclass(frozen=True, slots=True)
class BulkScope:
    """What a retry or cancel covers: ids, or a filter walked in queue order.

    A filter covers the tasks enqueued up to queue position `through_seq` (0: as of now;
    a dry run returns the position it counted at, so the action covers what the operator
    saw) and resumes after `after_seq` (0: from the oldest). One call works for at most
    `BULK_CALL_BUDGET`, then returns where it stopped: every call is short, and a call
    repeated after a lost reply resumes from the same place instead of starting over.
    """

    task_ids: tuple[str, ...] = ()
    task_filter: TaskFilter | None = None
    dry_run: bool = False
    limit: int = 0
    through_seq: int = 0
    after_seq: int = 0


@dataclass(frozen=True, slots=True)
class BulkProgress:
    """A bulk call's result and, for a filter, where the walk stands."""

    result: BulkResult
    through_seq: int = 0
    next_after_seq: int = 0
    complete: bool = True


async def _list(
    conn: Any, states: Sequence[str], task_type: str | None, before_seq: int, limit: int
) -> list[asyncpg.Record]:
    """Each filter shape has its own query, so each is planned on its own index."""
    if task_type is None:
        return await queries.task_list_by_state(
            conn, states=states, before_seq=before_seq, limit=limit
        )
    return await queries.task_list_by_type_and_state(
        conn, states=states, task_type=task_type, before_seq=before_seq, limit=limit
    )


async def _list_oldest(
    conn: Any,
    *,
    states: Sequence[str],
    task_type: str | None,
    after_seq: int,
    through_seq: int,
    limit: int,
) -> list[asyncpg.Record]:
    if task_type is None:
        return await queries.task_list_oldest_by_state(
            conn, states=states, after_seq=after_seq, through_seq=through_seq, limit=limit
        )
    return await queries.task_list_oldest_by_type_and_state(
        conn,
        states=states,
        task_type=task_type,
        after_seq=after_seq,
        through_seq=through_seq,
        limit=limit,
    )


def parse_page_token(token: str) -> int:
    """The keyset behind a page token (the queue position to continue below)."""
    if not token:
        return queries.FIRST_PAGE
    # isascii: str.isdigit() also accepts digits int() cannot read, such as "²"; the length
    # check comes first because int() refuses strings of thousands of digits.
    if (
        len(token) > len(str(queries.FIRST_PAGE))
        or not (token.isascii() and token.isdigit())
        or not 0 < int(token) <= queries.FIRST_PAGE
    ):
        raise InvalidTask(f"malformed page token {token[:40]!r}", field="page_token")
    return int(token)


def _reason(text: str, default: str) -> str:
    text = text.strip()
    if len(text) > MAX_REASON:
        raise InvalidTask(f"reason is {len(text)} characters; the limit is {MAX_REASON}")
    if "\x00" in text:
        raise InvalidTask("reason must not contain NUL characters")
    return text or default


class TaskControl:
    """Operator queries and actions on tasks and task types."""

    def __init__(
        self,
        database: Database,
        notifier: TaskNotifier,
        metrics: ServerMetrics,
        *,
        explainer: Explainer,
    ) -> None:
        """Wire to the database; `notifier` wakes local long polls after a retry or resume."""
        self._database = database
        self._notifier = notifier
        self._metrics = metrics
        self._explainer = explainer

    # --- reading -------------------------------------------------------------------------

    async def list_tasks(
        self, task_filter: TaskFilter, *, limit: int = DEFAULT_PAGE, page_token: str = ""
    ) -> TaskPage:
        """One page of tasks, newest first."""
        if limit < 1:
            raise InvalidTask("limit must be at least 1", field="limit")
        limit = min(limit, MAX_PAGE)
        # A state named twice would be scanned twice: each task listed once.
        states = tuple(dict.fromkeys(task_filter.states)) or ALL_STATES
        task_type = validate_task_type(task_filter.task_type) if task_filter.task_type else None
        async with self._database.connection() as conn:
            rows = await _list(
                conn,
                [state.value for state in states],
                task_type,
                parse_page_token(page_token),
                limit + 1,  # one more than asked: is there a next page?
            )
        page = rows[:limit]
        next_token = str(page[-1]["seq"]) if len(rows) > limit else None
        return TaskPage(
            tasks=tuple(status_from_row(row) for row in page), next_page_token=next_token
        )

    async def explain_task(self, task_id: str) -> tuple[TaskState, list[str]]:
        """A task's state and why it is there, in sentences (one indexed query)."""
        task_id = normalize_task_id(task_id)
        async with self._database.connection() as conn:
            explained = await self._explainer.read(conn, task_id)
        if explained is None:
            raise TaskNotFound(task_id=task_id)
        row, reasons = explained
        return TaskState(row["state"]), reasons

    async def task_detail(self, task_id: str, *, before: int | None = None) -> TaskDetail:
        """Everything about one task, read from one snapshot so the parts agree.

        Its history: the first event and the HISTORY_PAGE latest ones, or, with `before`
        (a detail's `older_history`), those before that event.
        """
        task_id = normalize_task_id(task_id)
        if before is not None and not 0 < before <= MAX_EVENT_ID:
            raise InvalidTask("the history page is not an event of this task", field="before")
        async with self._database.snapshot() as conn:
            row = await queries.task_get(conn, task_id=task_id)
            if row is None:
                raise TaskNotFound(task_id=task_id)
            events = await queries.task_event_list(
                conn,
                task_id=task_id,
                limit=HISTORY_PAGE,
                max_bytes=HISTORY_BYTES,
                before=before,
            )
            payload = await queries.task_payload_head(
                conn, task_id=task_id, length=PAYLOAD_PREVIEW_BYTES
            )
            explained = await self._explainer.read(conn, task_id)
        status = status_from_row(row, events)
        why, reasons = explained if explained is not None else (None, [])
        paused = None
        if why is not None and why["paused_at"] is not None:
            paused = PausedType(
                type=status.type, paused_at=why["paused_at"], reason=why["paused_reason"]
            )
        return TaskDetail(
            status=replace(status, payload=payload["head"] if payload else None),
            explanation=tuple(reasons),
            paused=paused,
            payload_size=payload["size"] if payload else 0,
            # The oldest event of the page after the first: where the page before ends.
            older_history=events[1]["id"] if status.history_omitted else None,
        )

    async def paused_types(self) -> list[PausedType]:
        """Every paused type, by name."""
        async with self._database.connection() as conn:
            rows = await queries.paused_type_list(conn)
        return [
            PausedType(
                type=row["type"],
                paused_at=row["paused_at"],
                reason=row["reason"],
                paused_by=row["paused_by"],
            )
            for row in rows
        ]

    # --- acting --------------------------------------------------------------------------

    # Every action names its actor ("name (token id)", see auth.Principal.actor): the history
    # and the audit log record who did what.

    async def retry_tasks(self, scope: BulkScope, *, reason: str = "", actor: str) -> BulkProgress:
        """Re-queue failed or cancelled tasks as a new series of attempts."""
        detail = _reason(reason, "retried by an operator")
        apply = functools.partial(queries.task_retry_many, actor=actor)
        return await self._bulk("retry", apply, RETRYABLE, scope, detail)

    async def cancel_tasks(self, scope: BulkScope, *, reason: str = "", actor: str) -> BulkProgress:
        """Cancel queued or running tasks (running leases are revoked at once)."""
        detail = _reason(reason, "cancelled by an operator")
        apply = functools.partial(queries.task_cancel_many, actor=actor)
        return await self._bulk("cancel", apply, CANCELLABLE, scope, detail)

    async def pause_type(self, task_type: str, reason: str = "", *, actor: str) -> bool:
        """Stop leasing `task_type`; False if it was already paused."""
        task_type = validate_task_type(task_type)
        async with self._database.connection() as conn:
            changed = await queries.paused_type_set(
                conn, task_type=task_type, reason=_reason(reason, "") or None, actor=actor
            )
        if changed:
            self._metrics.operator_actions.labels("pause").inc()
            log.info("type %s paused by %s", task_type, actor, extra={"event": "type_paused"})
        return changed

    async def record(self, *, actor: str, action: str, target: str, detail: str = "") -> None:
        """Write an action on no task or type of its own (a login) to the audit log."""
        async with self._database.connection() as conn:
            await queries.audit_log_add(
                conn, actor=actor, action=action, target=target, detail=detail or None
            )

    async def resume_type(self, task_type: str, *, actor: str) -> bool:
        """Lease `task_type` again; False if it was not paused."""
        task_type = validate_task_type(task_type)
        async with self._database.connection() as conn:
            changed = await queries.paused_type_clear(conn, task_type=task_type, actor=actor)
        if changed:
            self._notifier.wake()
            self._metrics.operator_actions.labels("resume").inc()
            log.info("type %s resumed by %s", task_type, actor, extra={"event": "type_resumed"})
        return changed

    async def _bulk(
        self,
        action: str,
        apply: Callable[..., Awaitable[list[asyncpg.Record]]],
        applicable: tuple[TaskState, ...],
        scope: BulkScope,
        detail: str,
    ) -> BulkProgress:
        if bool(scope.task_ids) == (scope.task_filter is not None):
            raise InvalidTask(f"{action}: give either task ids or a filter")
        if scope.limit < 0 or scope.through_seq < 0 or scope.after_seq < 0:
            raise InvalidTask(f"{action}: limit and queue positions must not be negative")
        if max(scope.through_seq, scope.after_seq) > MAX_QUEUE_POSITION:
            raise InvalidTask(
                f"{action}: queue positions go up to {MAX_QUEUE_POSITION}, not "
                f"{max(scope.through_seq, scope.after_seq)}"
            )
        if scope.task_filter is None:
            if scope.dry_run:
                raise InvalidTask(f"{action}: a dry run needs a filter, not ids")
            progress = BulkProgress(
                await self._by_ids(action, apply, applicable, scope.task_ids, detail)
            )
        else:
            progress = await self._by_filter(
                action, apply, applicable, scope, scope.task_filter, detail
            )
        result = progress.result
        if result.changed:
            log.info("%s applied to %d task(s)", action, result.changed, extra={"event": action})
        return progress

    async def _by_ids(
        self,
        action: str,
        apply: Callable[..., Awaitable[list[asyncpg.Record]]],
        applicable: tuple[TaskState, ...],
        task_ids: Sequence[str],
        detail: str,
    ) -> BulkResult:
        if len(task_ids) > MAX_IDS:
            raise InvalidTask(f"{len(task_ids)} task ids in one call; the limit is {MAX_IDS}")
        ids = list(dict.fromkeys(normalize_task_id(task_id) for task_id in task_ids))

        async def apply_and_count() -> tuple[set[str], dict[str, str]]:
            async with self._database.transaction() as conn:
                known = await queries.task_states_get(conn, task_ids=ids)
                missing = [task_id for task_id in ids if task_id not in known]
                if missing:
                    raise TaskNotFound(task_id=missing[0])
                rows = await apply(
                    conn,
                    task_ids=ids,
                    detail=detail,
                    states=[state.value for state in applicable],
                )
                changed = {str(row["id"]) for row in rows}
                # Read again under the action's locks: the state that made each one not
                # apply.
                now = await queries.task_states_get(
                    conn, task_ids=[task_id for task_id in ids if task_id not in changed]
                )
                # Deleted since the first read, which locks nothing (retention's delete,
                # committed while the action waited for the row): as unknown as if it had
                # gone before the call, and the call changes nothing, rather than answering
                # for fewer tasks than it matched.
                gone = [task_id for task_id in ids if task_id not in changed and task_id not in now]
                if gone:
                    raise TaskNotFound(task_id=gone[0])
            self._after_change(action, rows)
            return changed, now

        changed, now = await outliving_the_call(apply_and_count())
        return BulkResult(
            matched=len(ids),
            changed=len(changed),
            changed_ids=tuple(task_id for task_id in ids if task_id in changed),
            skipped=tuple((task_id, TaskState(state)) for task_id, state in now.items()),
        )

    async def _by_filter(  # noqa: PLR0917 - private helper of _bulk
        self,
        action: str,
        apply: Callable[..., Awaitable[list[asyncpg.Record]]],
        applicable: tuple[TaskState, ...],
        scope: BulkScope,
        task_filter: TaskFilter,
        detail: str,
    ) -> BulkProgress:
        states = tuple(dict.fromkeys(task_filter.states)) or applicable
        wrong = [state.value for state in states if state not in applicable]
        if wrong:
            allowed = " or ".join(state.value for state in applicable)
            raise InvalidTask(f"{action} applies to {allowed} tasks, not {', '.join(wrong)}")
        task_type = validate_task_type(task_filter.task_type) if task_filter.task_type else None
        state_names = [state.value for state in states]
        limit = scope.limit
        async with self._database.connection() as conn:
            # Only tasks that existed when the action began (or at its dry run): work
            # enqueued, or re-queued by this very action, meanwhile is not swept up.
            ceiling = scope.through_seq or await queries.task_seq_last(conn)
            if scope.dry_run:
                count = (
                    await queries.task_count_by_state(conn, states=state_names)
                    if task_type is None
                    else await queries.task_count_by_type_and_state(
                        conn, states=state_names, task_type=task_type
                    )
                )
                matched = min(count, limit) if limit else count
                return BulkProgress(BulkResult(matched=matched, changed=0), through_seq=ceiling)
        changed = 0
        cursor = scope.after_seq
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + BULK_CALL_BUDGET
        # Oldest first, in queue order; the cursor only moves forward, so the walk ends.
        while not limit or changed < limit:
            if loop.time() > give_up_at:
                return BulkProgress(
                    BulkResult(matched=changed, changed=changed),
                    through_seq=ceiling,
                    next_after_seq=cursor,
                    complete=False,
                )
            batch = BULK_BATCH if not limit else min(BULK_BATCH, limit - changed)

            async def apply_batch(after_seq: int, size: int) -> tuple[int, int] | None:
                """The batch's last queue position and how many it changed; None: no tasks."""
                async with self._database.transaction() as conn:
                    rows = await _list_oldest(
                        conn,
                        states=state_names,
                        task_type=task_type,
                        after_seq=after_seq,
                        through_seq=ceiling,
                        limit=size,
                    )
                    if not rows:
                        return None
                    # `apply` re-checks each state under its row lock: a task that left
                    # the filtered states since it was listed is left alone.
                    done = await apply(
                        conn,
                        task_ids=[str(row["id"]) for row in rows],
                        detail=detail,
                        states=state_names,
                    )
                self._after_change(action, done)
                return int(rows[-1]["seq"]), len(done)

            # Each batch runs to its end and is counted even if the call is cancelled
            # meanwhile; the walk then stops at the batch's end.
            applied = await outliving_the_call(apply_batch(cursor, batch))
            if applied is None:
                break
            cursor, done_count = applied
            changed += done_count
        return BulkProgress(
            BulkResult(matched=changed, changed=changed),
            through_seq=ceiling,
            next_after_seq=cursor,
        )

    def _after_change(self, action: str, rows: Sequence[asyncpg.Record]) -> None:
        """Count what one committed statement of `action` changed, and wake for retries.

        Called where the write commits, inside `outliving_the_call`: a call cancelled
        while its COMMIT was in flight still counts what it changed.
        """
        if not rows:
            return
        self._metrics.operator_actions.labels(action).inc(len(rows))
        if action == "retry":
            self._notifier.wake()
        else:
            for row in rows:
                self._metrics.task_outcomes.labels(
                    self._metrics.type_label(row["type"]), "cancelled"
                ).inc()
