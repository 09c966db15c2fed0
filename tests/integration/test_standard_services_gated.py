"""gRPC's health and reflection streams want a token when the server asks for tokens.

docs/security.md, threat model: anyone who can reach the port is stopped by tokens. Every
Conveyor RPC goes through the gate, but the server also serves grpc's Health service and
server reflection, which did not: `Health/Watch` and `ServerReflectionInfo` are streams
that stay open as long as the caller likes, each holding one of `--max-concurrent-rpcs`.
A caller with no token at all took every slot, and every worker and producer was then
refused RESOURCE_EXHAUSTED (found by a review). Now both streams want a valid token; the
probes' `Health/Check` still answers anyone.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conveyor.auth import Role, new_token
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from conftest import ServerThread

SLOTS = 3
Metadata = tuple[tuple[str, str], ...]


def open_watch(channel: grpc.Channel, metadata: Metadata) -> Any:
    """A Health/Watch stream and its first answer (it raises the call's refusal)."""
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), metadata=metadata, timeout=60
    )
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    return stream


# Set when a test ends: the reflection streams' request iterators then finish.
RELEASED = threading.Event()


def open_reflection(channel: grpc.Channel, metadata: Metadata) -> Any:
    """A reflection stream left open after its first answer (it raises the refusal)."""

    def requests() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        RELEASED.wait(60)  # no half-close: the call stays open until the test ends

    stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        requests(), metadata=metadata, timeout=60
    )
    assert next(stream).list_services_response.service
    return stream


@pytest.mark.parametrize("open_stream", [open_watch, open_reflection], ids=["watch", "reflection"])
def test_a_stream_without_a_token_is_refused_and_holds_no_slot(
    start_server: Callable[..., ServerThread],
    tmp_path: Path,
    open_stream: Callable[[grpc.Channel, Metadata], Any],
) -> None:
    admin, entry = new_token("ops", Role.ADMIN)
    viewer, viewer_entry = new_token("look", Role.VIEWER)
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(entry.as_toml() + "\n" + viewer_entry.as_toml())
    server = start_server(tokens_file=tokens, max_concurrent_rpcs=SLOTS + 1, rate_limit=None)
    RELEASED.clear()
    held: list[Any] = []
    with grpc.insecure_channel(server.address) as channel:
        try:
            for _ in range(SLOTS):
                with pytest.raises(grpc.RpcError) as refused:
                    held.append(open_stream(channel, ()))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # The probes' call answers anyone.
            check = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            # Any valid token may watch or reflect (a viewer's here).
            held.append(open_stream(channel, (("authorization", f"Bearer {viewer}"),)))
            # The refused streams hold no slot: the admin's call is answered, not
            # RESOURCE_EXHAUSTED.
            with pytest.raises(grpc.RpcError) as answered:
                pb_grpc.TaskServiceStub(channel).GetTask(
                    pb.GetTaskRequest(task_id="00000000-0000-0000-0000-000000000000"),
                    metadata=(("authorization", f"Bearer {admin}"),),
                    timeout=10,
                )
            assert answered.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            RELEASED.set()
            for stream in held:
                stream.cancel()


def test_without_tokens_the_streams_answer_anyone(server: ServerThread) -> None:
    RELEASED.clear()
    with grpc.insecure_channel(server.address) as channel:
        streams = [open_watch(channel, ()), open_reflection(channel, ())]
        RELEASED.set()
        for stream in streams:
            stream.cancel()
    assert len(streams) == 2
