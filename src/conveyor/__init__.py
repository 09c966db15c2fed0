"""Conveyor: a durable distributed task queue for Python, on PostgreSQL, over gRPC.

The public surface is what this module exports; everything else is internal.

    from conveyor import Client, Task, Worker

    with Client("localhost:50051") as client:
        task_id = client.enqueue_task(Task(type="send_email", payload=b"..."))
"""

__version__ = "0.1.0"

from conveyor import errors
from conveyor.client.async_client import AsyncClient
from conveyor.client.channel import RetryPolicy, TlsConfig
from conveyor.client.sync_client import Client
from conveyor.codec import AesGcmCodec, PayloadCodec
from conveyor.errors import ConveyorError
from conveyor.logs import ContextFilter as LogContextFilter
from conveyor.logs import configure_logging
from conveyor.types import (
    BulkResult,
    ClusterStatus,
    PausedType,
    Task,
    TaskEvent,
    TaskPage,
    TaskState,
    TaskStatus,
    TypeStatus,
    WorkerInfo,
)
from conveyor.worker.context import TaskContext
from conveyor.worker.runtime import Worker

__all__ = [
    "AesGcmCodec",
    "AsyncClient",
    "BulkResult",
    "Client",
    "ClusterStatus",
    "ConveyorError",
    "LogContextFilter",
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
    "__version__",
    "configure_logging",
    "errors",
]
