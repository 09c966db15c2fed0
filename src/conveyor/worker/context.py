"""TaskContext: what a handler knows about the attempt it is running."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from conveyor.logs import ContextAdapter

if TYPE_CHECKING:
    from collections.abc import Callable


def _no_progress_sink(_details: str | None) -> None:
    """Where progress goes when a context is built outside a worker (tests)."""


# Guards the lazy creation of a context's `cancelled` event: a sync handler's thread and
# the worker's event loop may both ask for it first, and they must get the same event.
_CANCELLED_CREATION = threading.Lock()


class TaskContext:
    """The attempt a handler is running. Treat it as read-only.

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

    A worker builds one per attempt, so it is a slotted class whose `cancelled` event and
    `logger` are made when first used: most handlers touch neither, and building both for
    every attempt was a tenth of a no-op task's cost in the worker.
    """

    __slots__ = (
        "_cancelled",
        "_logger",
        "_progress_sink",
        "_worker_id",
        "attempt",
        "deadline",
        "lease_id",
        "max_retries",
        "task_id",
        "task_type",
    )

    def __init__(
        self,
        *,
        task_id: str,
        task_type: str,
        attempt: int,
        max_retries: int,
        lease_id: str,
        deadline: datetime,
        worker_id: str | None = None,
        logger: logging.LoggerAdapter[logging.Logger] | None = None,
        cancelled: threading.Event | None = None,
        _progress_sink: Callable[[str | None], None] = _no_progress_sink,
    ) -> None:
        """Describe one attempt; `worker_id` goes on the default logger's records."""
        self.task_id = task_id
        self.task_type = task_type
        self.attempt = attempt
        self.max_retries = max_retries
        self.lease_id = lease_id
        self.deadline = deadline
        self._worker_id = worker_id
        self._logger = logger
        self._cancelled = cancelled
        self._progress_sink = _progress_sink

    @property
    def cancelled(self) -> threading.Event:
        """Set when this attempt must stop (see the class docstring)."""
        event = self._cancelled
        if event is None:
            with _CANCELLED_CREATION:
                event = self._cancelled
                if event is None:
                    event = self._cancelled = threading.Event()
        return event

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger for this attempt (see the class docstring)."""
        logger = self._logger
        if logger is None:
            # Two threads racing here build two equal adapters; either is right.
            logger = self._logger = ContextAdapter(
                logging.getLogger(f"conveyor.task.{self.task_type}"),
                {
                    "task_id": self.task_id,
                    "task_type": self.task_type,
                    "attempt": self.attempt,
                    "worker_id": self._worker_id,
                    "lease_id": self.lease_id,
                },
            )
        return logger

    def __repr__(self) -> str:
        """The attempt's identity, for logs and debuggers."""
        return (
            f"TaskContext(task_id={self.task_id!r}, task_type={self.task_type!r}, "
            f"attempt={self.attempt}, lease_id={self.lease_id!r})"
        )

    def heartbeat(self, details: str | None = None) -> None:
        """Prove progress: renew this attempt's lease now and record `details` on the task.

        Leases are renewed by the worker anyway while the handler runs; call this from long
        handlers to make progress visible (`conveyor status`) and to renew at once after a
        long stretch. Safe from sync handlers (any thread) and async ones; never blocks.
        Characters the wire cannot carry (lone surrogates, as in a file name that did not
        decode) arrive as backslash escapes.
        """
        if details is not None and not isinstance(details, str):
            raise TypeError("heartbeat details must be a str (serialise structured data)")
        self._progress_sink(details)

    def time_left(self) -> timedelta:
        """Time until the deadline (negative once it has passed)."""
        return self.deadline - datetime.now(UTC)
