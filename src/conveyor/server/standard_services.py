"""gRPC's own health and reflection services, their open-ended streams behind the gate.

Conveyor's services admit every call through the gate (server/rpc.py); these two come from
grpcio and did not. `Health/Watch` and `ServerReflectionInfo` are streams that last as long
as the caller likes, each holding one of `max_concurrent_rpcs`: with tokens on, a caller
without any could open enough of them to lock every worker and producer out. With tokens,
they now want a valid one (any role); `Health/Check`, the probes' unary call, still answers
anyone, and without tokens nothing changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_reflection.v1alpha import _async as reflection_aio

from conveyor.errors import Unauthenticated

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Sequence

    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from conveyor.server.security import Gate


async def _require_token(gate: Gate, context: Any) -> None:
    """Abort the call UNAUTHENTICATED unless tokens are off or it carries a valid one."""
    if not gate.authenticating:
        return
    try:
        gate.identify(context.invocation_metadata)
    except Unauthenticated as exc:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)


class GatedHealth(health_aio.HealthServicer):  # type: ignore[misc]
    """The health service; `Watch` wants a token when the server asks for tokens."""

    def __init__(self, gate: Gate) -> None:
        """Serve health for the server behind `gate`."""
        super().__init__()
        self._gate = gate

    async def Watch(  # noqa: N802 - gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> None:
        """As grpc's, once the caller is known."""
        await _require_token(self._gate, context)
        await super().Watch(request, context)


class GatedReflection(reflection_aio.ReflectionServicer):  # type: ignore[misc]
    """Server reflection; it wants a token when the server asks for tokens."""

    def __init__(self, service_names: Sequence[str], gate: Gate) -> None:
        """Describe `service_names` to callers `gate` admits."""
        super().__init__(service_names)
        self._gate = gate

    async def ServerReflectionInfo(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: Any,
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        """As grpc's, once the caller is known."""
        await _require_token(self._gate, context)
        async for response in super().ServerReflectionInfo(request_iterator, context):
            yield response
