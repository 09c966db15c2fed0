"""TaskContext: what a handler knows about the attempt it is running."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable


def _no_progress_sink(_details: str | None) -> None:
    """Where progress goes when a context is built outside a worker (tests)."""


@dataclass(frozen=True, kw_only=True)
class TaskContext:
    """The attempt a handler is running.

    Attributes:
        task_id: The task's id.
        task_type: The task's type.
        attempt: 1 for the first attempt, 2 for the first retry, and so on.
        max_retries: Retries allowed after the first attempt.
        lease_id: The fencing token of this attempt; it changes on every attempt. Use
            task_id as the idempotency key of an effect that must happen once per task
            (a task can run again after a lease expiry, with a new attempt and lease_id);
            use lease_id only to tell attempts apart in your own records.
        deadline: When this attempt times out (UTC, by the database clock).
        cancelled: Set when the task is cancelled, its lease is lost, its timeout passes or
            the worker shuts down. Sync handlers should check it in long loops; async
            handlers are also cancelled outright.
        logger: A logger whose records carry the task id, type, attempt, lease id and worker
            id (records from any logger inside the handler carry them too, under the
            `conveyor` CLI or with `conveyor.logs.ContextFilter` installed).
    """

    task_id: str
    task_type: str
    attempt: int
    max_retries: int
    lease_id: str
    deadline: datetime
    logger: logging.LoggerAdapter[logging.Logger]
    cancelled: threading.Event = field(default_factory=threading.Event)
    _progress_sink: Callable[[str | None], None] = field(
        default=_no_progress_sink, repr=False, compare=False
    )

    def heartbeat(self, details: str | None = None) -> None:
        """Prove progress: renew this attempt's lease now and record `details` on the task.

        Leases are renewed by the worker anyway while the handler runs; call this from long
        handlers to make progress visible (`conveyor status`) and to renew at once after a
        long stretch. Safe from sync handlers (any thread) and async ones; never blocks.
        """
        if details is not None and not isinstance(details, str):
            raise TypeError("heartbeat details must be a str (serialise structured data)")
        self._progress_sink(details)

    def time_left(self) -> timedelta:
        """Time until the deadline (negative once it has passed)."""
        return self.deadline - datetime.now(UTC)
