"""DashboardBackend: answers the dashboard's questions from the server's own parts.

The dashboard (in `monitoring`) knows nothing of the database; this adapter gives it the
same operations AdminService offers over gRPC (TaskControl for tasks and types,
`worker_listing` for workers, the stats sampler for numbers), and records that an action
came from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conveyor.protocol.limits import DEFAULT_WORKERS_PER_PAGE
from conveyor.server import worker_listing
from conveyor.server.control import BulkScope, TaskControl, TaskFilter

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from datetime import datetime

    from conveyor.server.database import Database
    from conveyor.server.stats_sampler import StatsSampler
    from conveyor.types import (
        BulkResult,
        ClusterStatus,
        TaskDetail,
        TaskPage,
        TaskState,
        WorkerPage,
    )


class DashboardBackend:
    """The server side of `monitoring.dashboard.views.DashboardSource`."""

    def __init__(
        self,
        control: TaskControl,
        stats: StatsSampler,
        cluster_status: Callable[[], Awaitable[ClusterStatus]],
        database: Database,
    ) -> None:
        """Read through `control`, the sampler's last snapshot and (workers) `database`."""
        self._control = control
        self._stats = stats
        self._cluster_status = cluster_status
        self._database = database

    async def cluster_status(self) -> ClusterStatus:
        """The status numbers (sampled)."""
        return await self._cluster_status()

    def chart_minutes(self) -> dict[datetime, dict[str, int]]:
        """Outcomes per minute over the last hour (sampled)."""
        return self._stats.snapshot.minutes

    async def list_tasks(
        self, states: tuple[TaskState, ...], task_type: str | None, limit: int, page_token: str
    ) -> TaskPage:
        """One page of tasks, newest first."""
        return await self._control.list_tasks(
            TaskFilter(states=states, task_type=task_type), limit=limit, page_token=page_token
        )

    async def task_detail(self, task_id: str, *, before: int | None = None) -> TaskDetail:
        """A task with payload, explanation and a page of its history."""
        return await self._control.task_detail(task_id, before=before)

    async def workers(self) -> WorkerPage:
        """The first page of registered workers that are not stopped, with their total."""
        return await worker_listing.list_workers(
            self._database, include_stopped=False, limit=DEFAULT_WORKERS_PER_PAGE
        )

    async def retry_task(self, task_id: str, *, actor: str) -> BulkResult:
        """Retry one failed or cancelled task."""
        progress = await self._control.retry_tasks(
            BulkScope(task_ids=(task_id,)), reason="retried from the dashboard", actor=actor
        )
        return progress.result

    async def cancel_task(self, task_id: str, *, actor: str) -> BulkResult:
        """Cancel one queued or running task."""
        progress = await self._control.cancel_tasks(
            BulkScope(task_ids=(task_id,)), reason="cancelled from the dashboard", actor=actor
        )
        return progress.result

    async def pause_type(self, task_type: str, *, actor: str) -> bool:
        """Stop leasing a type."""
        return await self._control.pause_type(task_type, "paused from the dashboard", actor=actor)

    async def record_login(self, *, actor: str, role: str) -> None:
        """Write a dashboard login to the audit log."""
        await self._control.record(actor=actor, action="dashboard_login", target=role)

    async def resume_type(self, task_type: str, *, actor: str) -> bool:
        """Lease a type again."""
        return await self._control.resume_type(task_type, actor=actor)
