"""The public surface is declared: only what conveyor/__init__.py exports is public."""

from __future__ import annotations

import inspect

import conveyor
from conveyor import errors

EXPECTED_EXPORTS = [
    "AesGcmCodec",
    "AsyncClient",
    "BreakerPolicy",
    "BulkResult",
    "Client",
    "ClusterStatus",
    "ConveyorError",
    "LogContextFilter",
    "OtherTypes",
    "PausedType",
    "PayloadCodec",
    "RetryPolicy",
    "Task",
    "TaskContext",
    "TaskEvent",
    "TaskPage",
    "TaskState",
    "TaskStatus",
    "TlsConfig",
    "TypeStatus",
    "Worker",
    "WorkerInfo",
    "WorkerPage",
    "__version__",
    "configure_logging",
    "errors",
]


class TestPublicSurface:
    def test_all_is_pinned_and_sorted(self) -> None:
        """Adding or removing a public name is a deliberate change to this list."""
        assert conveyor.__all__ == sorted(EXPECTED_EXPORTS)

    def test_every_exported_name_exists(self) -> None:
        """`from conveyor import *` cannot fail."""
        for name in conveyor.__all__:
            assert hasattr(conveyor, name), name

    def test_sync_and_async_clients_have_identical_method_names(self) -> None:
        """Client and AsyncClient are twins: the same public methods (besides dunders)."""

        def methods(cls: type) -> set[str]:
            return {
                name
                for name, _ in inspect.getmembers(cls, inspect.isfunction)
                if not name.startswith("_")
            }

        assert methods(conveyor.Client) == methods(conveyor.AsyncClient)
        assert {
            "enqueue_task",
            "enqueue_tasks",
            "get_task_status",
            "cancel_task",
            "list_workers",
            "list_workers_page",
            "explain_task",
            "get_status",
            "list_tasks",
            "retry_tasks",
            "cancel_tasks",
            "pause_type",
            "resume_type",
        } <= methods(conveyor.Client)

    def test_async_client_methods_are_coroutines(self) -> None:
        """Every public AsyncClient method is awaited."""
        public = [name for name in dir(conveyor.AsyncClient) if not name.startswith("_")]
        for name in public:
            assert inspect.iscoroutinefunction(getattr(conveyor.AsyncClient, name)), name


class TestErrorTree:
    def test_required_errors_exist_and_share_one_root(self) -> None:
        """The issue names these errors; all of them are ConveyorErrors."""
        for name in ("TaskNotFound", "InvalidTask", "TaskAlreadyFinished", "ServerUnavailable"):
            assert issubclass(getattr(errors, name), errors.ConveyorError)

    def test_every_error_class_is_documented_in_the_tree(self) -> None:
        """errors.py draws the tree in its docstring; a new class must be drawn there."""
        classes = [
            obj
            for obj in vars(errors).values()
            if inspect.isclass(obj) and issubclass(obj, errors.ConveyorError)
        ]
        assert errors.__doc__ is not None
        for cls in classes:
            assert cls.__name__ in errors.__doc__, cls.__name__

    def test_class_docstring_is_the_default_message(self) -> None:
        """Raised without arguments, an error says what its docstring says."""
        assert str(errors.ServerUnavailable()) == "No Conveyor server could be reached."

    def test_context_is_kept_in_attributes(self) -> None:
        """Callers read the id and state from attributes, not by parsing messages."""
        error = errors.TaskAlreadyFinished(task_id="abc", state="succeeded")
        assert error.task_id == "abc"
        assert error.state == "succeeded"
        assert "succeeded" in str(error)
