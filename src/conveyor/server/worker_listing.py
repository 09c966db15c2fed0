"""The workers listing behind ListWorkers (`conveyor workers`) and the dashboard's Workers page.

It owns the listing's order, its pages and its count. Workers in trouble come first (lost,
or a live one whose event loop was blocked for a second or more), then the newest: with
more workers than a page holds, the ones an operator is looking for are never the ones
left out, as the longest-running were when the list was newest first and cut at 500. Each
page says how many workers the listing holds in all (read from the same snapshot as the
page), and a keyset page token continues after its last worker. The token is opaque to
clients: the last worker's sort key, base64url-encoded so it pastes into a shell.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import InvalidTask
from conveyor.protocol.limits import MAX_WORKERS_PER_PAGE
from conveyor.storage import queries
from conveyor.types import WorkerInfo, WorkerPage

if TYPE_CHECKING:
    from conveyor.server.database import Database

# A token holds a flag, a timestamp in microseconds and a worker id (at most 200
# characters, 4 bytes each in UTF-8), base64-encoded: well under this.
MAX_TOKEN_LENGTH: Final = 1200
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


def token_after(row: Any) -> str:
    """The token that continues a listing after `row` (a `worker_list` row)."""
    micros = (row["started_at"] - _EPOCH) // _MICROSECOND
    key = f"{int(row['troubled'])}:{micros}:{row['id']}"
    return base64.urlsafe_b64encode(key.encode()).decode("ascii").rstrip("=")


def _position(token: str) -> queries.WorkerListPosition | None:
    """What a token holds, or None if it is no token this module made."""
    if len(token) > MAX_TOKEN_LENGTH:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        raw = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
        troubled, micros, worker_id = raw.split(":", 2)
        if not (micros.isascii() and micros.isdigit()):
            return None
        started_at = _EPOCH + int(micros) * _MICROSECOND
    except (ValueError, binascii.Error, OverflowError):  # UnicodeDecodeError is a ValueError
        return None
    # PostgreSQL text cannot hold NUL, so no worker id has one.
    if troubled not in {"0", "1"} or not worker_id or "\x00" in worker_id:
        return None
    return queries.WorkerListPosition(troubled == "1", started_at, worker_id)


def parse_page_token(token: str) -> queries.WorkerListPosition | None:
    """Where a listing continues; None for the first page. InvalidTask if malformed."""
    if not token:
        return None
    position = _position(token)
    if position is None:
        raise InvalidTask(f"malformed page token {token[:40]!r}", field="page_token")
    return position


def worker_from_row(row: Any) -> WorkerInfo:
    """A `worker_list` row as a WorkerInfo."""
    return WorkerInfo(
        id=row["id"],
        host=row["host"],
        pid=row["pid"],
        task_types=tuple(row["task_types"]),
        concurrency=row["concurrency"],
        version=row["version"],
        state=row["state"],
        started_at=row["started_at"],
        last_heartbeat_at=row["last_heartbeat_at"],
        # A lost or stopped worker holds no lease: the sweeper ended a lost one's, a stopping
        # one handed its back. Its last heartbeat's count read as tasks still running on it
        # ("3/4" for a worker lost 11 minutes before, in a review).
        in_flight=row["in_flight"] if row["state"] in ("active", "draining") else 0,
        loop_lag_ms=row["loop_lag_ms"],
        silent_for=row["silent_for"],
    )


async def list_workers(
    database: Database, *, include_stopped: bool, limit: int, page_token: str = ""
) -> WorkerPage:
    """One page of registered workers (stopped ones only if asked), with the total."""
    if limit < 1:
        raise InvalidTask("limit must be at least 1", field="limit")
    limit = min(limit, MAX_WORKERS_PER_PAGE)
    after = parse_page_token(page_token)
    # One snapshot: the total agrees with the page ("500 of 520", never "500 of 498").
    async with database.snapshot() as conn:
        rows = await queries.worker_list(
            conn,
            include_stopped=include_stopped,
            limit=limit + 1,  # one more than asked: is there a next page?
            after=after,
        )
        total = await queries.worker_list_count(conn, include_stopped=include_stopped)
    page = rows[:limit]
    return WorkerPage(
        workers=tuple(worker_from_row(row) for row in page),
        total=total,
        next_page_token=token_after(page[-1]) if len(rows) > limit else None,
    )
