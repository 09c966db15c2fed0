"""Conveyor: a durable distributed task queue for Python, on PostgreSQL, over gRPC.

The public surface is what this module exports; everything else is internal.

    from conveyor import Client, Task, Worker

    with Client("localhost:50051") as client:
        task_id = client.enqueue_task(Task(type="send_email", payload=b"..."))
"""

import os

__version__ = "0.1.0"

# Before grpc starts: its C core's fork handlers off, unless the application chose. A
# Client keeps a stream open with a thread waiting in grpc, and a fork taken meanwhile
# (subprocess with `user=` or `preexec_fn`, which cannot use vfork) ran grpc's child
# handlers, which restart its threads and call into the half-copied interpreter: 34 of 300
# such forks segfaulted before their exec in a test. Python's grpc has its own fork support
# off by default, so a child could never use the parent's channels anyway. The cost: a child
# forked while the parent held connections cannot connect at all, and is told so
# (client/channel.py, `_forked`); 'spawn' and 'forkserver' children, and children of a
# parent that had not connected yet, are unaffected.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# And its C core's own log lines at ERROR, unless the application chose: left unset, grpc
# prints INFO lines to stderr (a TLS handshake that failed, once per reconnection attempt;
# a fork), which buried the CLI's one-line `error:` under eight of them. Read once, when grpc
# is imported, so here: the CLI's modules are imported after this package's, and grpc
# with it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from conveyor import errors
from conveyor.breaker import BreakerPolicy
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
    OtherTypes,
    PausedType,
    Task,
    TaskEvent,
    TaskPage,
    TaskState,
    TaskStatus,
    TypeStatus,
    WorkerInfo,
    WorkerPage,
)
from conveyor.worker.context import TaskContext
from conveyor.worker.runtime import Worker

__all__ = [
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
