"""HandlerRegistry: which function handles which task type, and whether it is async."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor.errors import ConfigError, InvalidTask
from conveyor.types import validate_task_type

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from conveyor.worker.context import TaskContext

    # What a handler may return: bytes-like (the result) or None (no result).
    HandlerResult = bytes | bytearray | memoryview | None
    SyncHandler = Callable[[TaskContext, bytes], HandlerResult]
    AsyncHandler = Callable[[TaskContext, bytes], Awaitable[HandlerResult]]
    Handler = SyncHandler | AsyncHandler


@dataclass(frozen=True, slots=True)
class RegisteredHandler:
    """A handler and how to call it."""

    task_type: str
    fn: Callable[..., Any]
    is_async: bool


class HandlerRegistry:
    """Maps task types to handlers. A worker leases only the types registered here."""

    def __init__(self) -> None:
        """Start empty."""
        self._handlers: dict[str, RegisteredHandler] = {}

    def register(self, task_type: str, fn: Handler) -> None:
        """Register `fn(ctx, payload)` for `task_type`; `def` and `async def` both work."""
        try:
            validate_task_type(task_type)
        except InvalidTask as exc:
            raise ConfigError(f"cannot register a handler: {exc.message}") from None
        if not callable(fn):
            raise ConfigError(f"the handler for {task_type!r} is not callable")
        if isinstance(fn, type):
            # Calling a class builds an instance: with an async __call__ it was taken for an
            # async handler and every attempt failed awaiting the instance.
            raise ConfigError(
                f"the handler for {task_type!r} is the class {fn.__name__}: register an "
                "instance of it, or a function"
            )
        if task_type in self._handlers:
            raise ConfigError(f"a handler for {task_type!r} is already registered")
        is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
        )
        self._handlers[task_type] = RegisteredHandler(task_type, fn, is_async)

    def get(self, task_type: str) -> RegisteredHandler | None:
        """The handler for `task_type`, if any."""
        return self._handlers.get(task_type)

    def task_types(self) -> list[str]:
        """Every registered type, sorted."""
        return sorted(self._handlers)
