"""AdminService: what operators ask of and do to the cluster over gRPC.

Reads (workers, leadership, status, task listings, explanations) and actions (retry,
cancel, pause, resume). The rules live in `TaskControl` and, for the workers listing,
`worker_listing`, both shared with the dashboard; this module only translates between
protobuf and them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from conveyor.protocol import convert
from conveyor.protocol.limits import DEFAULT_WORKERS_PER_PAGE
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server import worker_listing
from conveyor.server.control import BulkProgress, BulkScope, TaskControl, TaskFilter
from conveyor.server.rpc import rpc_method
from conveyor.server.security import OPEN_GATE, Gate, caller

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from datetime import timedelta

    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.database import Database
    from conveyor.server.leadership import LeaderElector
    from conveyor.types import ClusterStatus

DEFAULT_TASK_PAGE: Final = 50


def _filter(message: pb.TaskFilter) -> TaskFilter:
    return TaskFilter(
        states=tuple(convert.states_from_pb(message.states)), task_type=message.type or None
    )


class AdminService(pb_grpc.AdminServiceServicer):
    """Operator queries and actions."""

    # Who may call (see rpc.rpc_method); open until the server installs its own gate.
    gate: Gate = OPEN_GATE

    def __init__(
        self,
        database: Database,
        elector: LeaderElector,
        metrics: ServerMetrics,
        worker_lost_after: timedelta,
        *,
        control: TaskControl,
        cluster_status: Callable[[], Awaitable[ClusterStatus]],
    ) -> None:
        """Wire the service to its collaborators."""
        self.worker_lost_after = worker_lost_after
        self.database = database
        self.elector = elector
        self.metrics = metrics
        self.control = control
        self.cluster_status = cluster_status

    @rpc_method("ListWorkers")
    async def ListWorkers(  # noqa: N802 - gRPC method name
        self, request: pb.ListWorkersRequest, context: Any
    ) -> pb.ListWorkersResponse:
        """One page of registered workers, those in trouble first, with the total."""
        page = await worker_listing.list_workers(
            self.database,
            include_stopped=request.include_stopped,
            limit=request.limit or DEFAULT_WORKERS_PER_PAGE,
            page_token=request.page_token,
        )
        return pb.ListWorkersResponse(
            workers=[convert.worker_to_pb(info) for info in page.workers],
            total=page.total,
            next_page_token=page.next_page_token or "",
        )

    @rpc_method("GetLeader")
    async def GetLeader(  # noqa: N802 - gRPC method name
        self, request: pb.GetLeaderRequest, context: Any
    ) -> pb.GetLeaderResponse:
        """Who leads, as the database says, and which server answered."""
        leader = await self.elector.current_leader()
        if leader is None:
            return pb.GetLeaderResponse(server_id=self.elector.server_id)
        return pb.GetLeaderResponse(
            leader_id=leader.holder,
            term=leader.term,
            elected_at=convert.timestamp(leader.elected_at),
            expires_at=convert.timestamp(leader.expires_at),
            active=leader.active,
            server_id=self.elector.server_id,
        )

    @rpc_method("ExplainTask")
    async def ExplainTask(  # noqa: N802 - gRPC method name
        self, request: pb.ExplainTaskRequest, context: Any
    ) -> pb.ExplainTaskResponse:
        """Why a task is where it is."""
        state, reasons = await self.control.explain_task(request.task_id)
        return pb.ExplainTaskResponse(state=convert.STATE_TO_PB[state], reasons=reasons)

    @rpc_method("GetStatus")
    async def GetStatus(  # noqa: N802 - gRPC method name
        self, request: pb.GetStatusRequest, context: Any
    ) -> pb.GetStatusResponse:
        """The numbers behind /status."""
        return convert.cluster_status_to_pb(await self.cluster_status())

    @rpc_method("ListTasks")
    async def ListTasks(  # noqa: N802 - gRPC method name
        self, request: pb.ListTasksRequest, context: Any
    ) -> pb.ListTasksResponse:
        """One page of tasks, newest first."""
        page = await self.control.list_tasks(
            _filter(request.filter),
            limit=request.limit or DEFAULT_TASK_PAGE,
            page_token=request.page_token,
        )
        return pb.ListTasksResponse(
            tasks=[convert.status_to_info(status) for status in page.tasks],
            next_page_token=page.next_page_token or "",
        )

    @rpc_method("RetryTasks")
    async def RetryTasks(  # noqa: N802 - gRPC method name
        self, request: pb.BulkTaskRequest, context: Any
    ) -> pb.BulkTaskResponse:
        """Re-queue failed or cancelled tasks."""
        progress = await self.control.retry_tasks(
            _scope(request), reason=request.reason, actor=caller().actor
        )
        return _bulk_response(progress)

    @rpc_method("CancelTasks")
    async def CancelTasks(  # noqa: N802 - gRPC method name
        self, request: pb.BulkTaskRequest, context: Any
    ) -> pb.BulkTaskResponse:
        """Cancel queued or running tasks."""
        progress = await self.control.cancel_tasks(
            _scope(request), reason=request.reason, actor=caller().actor
        )
        return _bulk_response(progress)

    @rpc_method("PauseType")
    async def PauseType(  # noqa: N802 - gRPC method name
        self, request: pb.PauseTypeRequest, context: Any
    ) -> pb.PauseTypeResponse:
        """Stop leasing a type."""
        changed = await self.control.pause_type(request.type, request.reason, actor=caller().actor)
        return pb.PauseTypeResponse(changed=changed)

    @rpc_method("ResumeType")
    async def ResumeType(  # noqa: N802 - gRPC method name
        self, request: pb.ResumeTypeRequest, context: Any
    ) -> pb.ResumeTypeResponse:
        """Lease a paused type again."""
        return pb.ResumeTypeResponse(
            changed=await self.control.resume_type(request.type, actor=caller().actor)
        )


def _scope(request: pb.BulkTaskRequest) -> BulkScope:
    has_filter = request.HasField("filter")
    return BulkScope(
        task_ids=tuple(request.task_ids),
        task_filter=_filter(request.filter) if has_filter else None,
        dry_run=request.dry_run,
        limit=request.limit,
        through_seq=request.through_seq,
        after_seq=request.after_seq,
    )


def _bulk_response(progress: BulkProgress) -> pb.BulkTaskResponse:
    response = convert.bulk_result_to_pb(progress.result)
    response.through_seq = progress.through_seq
    response.next_after_seq = progress.next_after_seq
    response.complete = progress.complete
    return response
