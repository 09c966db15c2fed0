"""Conveyor's exception tree: every error a caller can catch, one class per cause.

```
ConveyorError
├── ConfigError            a component was configured with an impossible value
├── InvalidTask            the request is malformed (bad type, id, timeout, payload too large)
├── TaskNotFound           no task has this id
├── TaskAlreadyFinished    the task is in a final state; it cannot be cancelled
├── LeaseLost              the (task, lease) pair is no longer current: fencing rejected it
├── Unauthenticated        no credentials, or credentials the server does not accept
├── PermissionDenied       the credentials are valid but their role may not do this
├── LimitExceeded          a configured limit refused the request (rate, streams)
├── ServerUnavailable      no server answered in time (network, restart, database down)
│   └── CircuitOpen        every server's circuit breaker is open: failing fast
├── SchemaMismatch         this release cannot run on the database's schema
├── MigrationBlocked       a migration waited too long for a table lock; nothing was applied
├── MigrationFailed        PostgreSQL refused a migration's statement; nothing was applied
├── SealError              a sealed payload or result could not be opened (key, tampering)
├── WorkerCrashed          a worker's event loop ended on an error it could not handle
└── HandlerError           raised *by handlers*: fail the attempt with a clean message
    └── PermanentFailure   fail the task for good, without spending the remaining retries
```

Each class's docstring is its default message; context is kept in attributes so callers
never parse strings. Any of them raised by `enqueue_tasks` carries `committed_ids`: a call
of more than 1,000 tasks (or about 8 MiB) goes as several requests that commit one by one,
and those ids are the tasks that exist although the call failed. The gRPC mapping of
these classes lives in `conveyor.protocol.status`.
"""

from __future__ import annotations

import re
from typing import Final, Self


class ConveyorError(Exception):
    """Conveyor failed."""

    # Set by `enqueue_tasks` when it fails after some of its requests committed: the ids of
    # the tasks they created, in the order of the caller's list (empty otherwise).
    committed_ids: tuple[str, ...] = ()

    def __init__(self, message: str | None = None) -> None:
        """Use the class docstring's first line as the message when none is given."""
        summary = (type(self).__doc__ or type(self).__name__).strip().partition("\n")[0]
        super().__init__(message or summary)

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self.args[0])


class ConfigError(ConveyorError):
    """Invalid configuration."""


class InvalidTask(ConveyorError):
    """The task or request is invalid."""

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        """Record which field was wrong, when one field is to blame."""
        super().__init__(message)
        self.field = field


# The default messages below, read back by `from_message`: only the message crosses the
# wire (a gRPC status), and a client rebuilt the error with every attribute None.
_NOT_FOUND: Final = re.compile(r"task (\S+) not found")
_ALREADY_FINISHED: Final = re.compile(r"task (\S+) already finished \((\w+)\)")


class TaskNotFound(ConveyorError):
    """No task has this id."""

    def __init__(self, message: str | None = None, *, task_id: str | None = None) -> None:
        """Keep the id that was looked up."""
        super().__init__(message or (f"task {task_id} not found" if task_id else None))
        self.task_id = task_id

    @classmethod
    def from_message(cls, message: str) -> Self:
        """The error a server sent as `message`, its id read back from the default text."""
        found = _NOT_FOUND.fullmatch(message)
        return cls(message, task_id=found[1] if found else None)


class TaskAlreadyFinished(ConveyorError):
    """The task has already finished."""

    def __init__(
        self, message: str | None = None, *, task_id: str | None = None, state: str | None = None
    ) -> None:
        """Keep the id and the final state the task is in."""
        default = f"task {task_id} already finished ({state})" if task_id and state else None
        super().__init__(message or default)
        self.task_id = task_id
        self.state = state

    @classmethod
    def from_message(cls, message: str) -> Self:
        """The error a server sent as `message`, its id and state read back from the text."""
        found = _ALREADY_FINISHED.fullmatch(message)
        if found is None:
            return cls(message)
        return cls(message, task_id=found[1], state=found[2])


class LeaseLost(ConveyorError):
    """The lease is no longer current; the outcome was not applied."""


class Unauthenticated(ConveyorError):
    """The server did not accept the credentials (missing, unknown, or expired token)."""


class PermissionDenied(ConveyorError):
    """The credentials are valid, but their role or task types do not allow this."""


class LimitExceeded(ConveyorError):
    """A configured limit refused the request; retry later or send less.

    Attributes:
        retry_in: Seconds until the server would admit a request again, when it said
            (a rate limit does); 0.0 when it did not.
    """

    def __init__(self, message: str | None = None, *, retry_in: float = 0.0) -> None:
        """Keep the server's hint of when to retry."""
        super().__init__(message)
        self.retry_in = retry_in


class ServerUnavailable(ConveyorError):
    """No Conveyor server could be reached."""


class CircuitOpen(ServerUnavailable):
    """Every server failed repeatedly; calls fail fast until a probe succeeds."""

    def __init__(self, message: str | None = None, *, retry_in: float = 0.0) -> None:
        """Keep when the next probe is allowed."""
        super().__init__(message)
        self.retry_in = retry_in


class SchemaMismatch(ConveyorError):
    """The database schema does not match this version of Conveyor."""


class MigrationBlocked(ConveyorError):
    """A migration gave up waiting for a table lock; nothing was applied."""


class MigrationFailed(ConveyorError):
    """A migration's statement failed in PostgreSQL; nothing was applied."""


class SealError(ConveyorError):
    """Sealed data could not be opened: an unknown key, or data altered or moved."""


class WorkerCrashed(ConveyorError):
    """The worker stopped on an unexpected error, without draining or handing its tasks back."""


class HandlerError(ConveyorError):
    """The task handler failed."""


class PermanentFailure(HandlerError):
    """The task failed and must not be retried."""
