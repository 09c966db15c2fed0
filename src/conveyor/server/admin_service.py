"""AdminService: what operators ask of the cluster (workers, leadership) over gRPC."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import TaskNotFound
from conveyor.protocol import convert
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc
from conveyor.server.explanation import explain
from conveyor.server.rpc import rpc_method
from conveyor.storage import queries
from conveyor.types import TaskState, normalize_task_id

if TYPE_CHECKING:
    from datetime import timedelta

    from conveyor.monitoring.metrics import ServerMetrics
    from conveyor.server.database import Database
    from conveyor.server.leadership import LeaderElector

DEFAULT_WORKER_LIMIT: Final = 500
MAX_WORKER_LIMIT: Final = 10_000


class AdminService(pb_grpc.AdminServiceServicer):
    """Read-only operator queries for now; control actions come with the dashboard."""

    def __init__(
        self,
        database: Database,
        elector: LeaderElector,
        metrics: ServerMetrics,
        worker_lost_after: timedelta,
    ) -> None:
        """Wire the service to its collaborators."""
        self.worker_lost_after = worker_lost_after
        self.database = database
        self.elector = elector
        self.metrics = metrics

    @rpc_method("ListWorkers")
    async def ListWorkers(  # noqa: N802 - gRPC method name
        self, request: pb.ListWorkersRequest, context: Any
    ) -> pb.ListWorkersResponse:
        """Registered workers, newest first (stopped ones only if asked)."""
        limit = min(request.limit or DEFAULT_WORKER_LIMIT, MAX_WORKER_LIMIT)
        async with self.database.connection() as conn:
            rows = await queries.worker_list(
                conn, include_stopped=request.include_stopped, limit=limit
            )
        return pb.ListWorkersResponse(
            workers=[
                pb.WorkerInfo(
                    id=row["id"],
                    host=row["host"],
                    pid=row["pid"],
                    task_types=row["task_types"],
                    concurrency=row["concurrency"],
                    version=row["version"],
                    state=row["state"],
                    started_at=convert.timestamp(row["started_at"]),
                    last_heartbeat_at=convert.timestamp(row["last_heartbeat_at"]),
                    in_flight=row["in_flight"],
                    loop_lag_ms=row["loop_lag_ms"],
                )
                for row in rows
            ]
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
        task_id = normalize_task_id(request.task_id)
        async with self.database.connection() as conn:
            row = await queries.task_explain(
                conn, task_id=task_id, live_within=self.worker_lost_after
            )
        if row is None:
            raise TaskNotFound(task_id=task_id)
        return pb.ExplainTaskResponse(
            state=convert.STATE_TO_PB[TaskState(row["state"])], reasons=explain(row)
        )
