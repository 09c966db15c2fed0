"""EnqueueStream: numbered EnqueueTasks requests on one call, each answered on its own.

Real server, real PostgreSQL, real gRPC: a raw stream driven from the test (as
test_work_stream.py drives Work), and the real AsyncClient, which sends its enqueues on
one stream per server. What must hold: every request is answered with its own number and
exactly what the EnqueueTasks call would have given (the ids, which tasks it created, or
the refusal's code and message), a refused request leaves the stream usable, and the
tasks are in the database once however often a request is sent; request_id 0, a number
still in use and bytes that are no message end the stream INVALID_ARGUMENT; a half-close
or a stopping server ends it OK after the answers; tokens, roles and the rate limit are
checked for every request, and one token holds at most its cap of open streams (a client
refused one enqueues with calls); a server with streams off answers UNIMPLEMENTED and the
client then enqueues with calls; the open streams and each request are counted in /metrics; and
an AsyncClient whose server goes away enqueues on the next one, losing and duplicating
nothing.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from helpers import async_wait_for, metric_samples, wait_for, writes_blocked
from work_streams import ENDED, RawCall, RawEnqueueStream

from conveyor import AsyncClient, Client, RetryPolicy, Task
from conveyor.auth import Role, TokenEntry, new_token
from conveyor.breaker import BreakerPolicy
from conveyor.client import channel as channel_module
from conveyor.client.enqueue_stream import STREAM_RETRY_AFTER
from conveyor.errors import ConveyorError, LimitExceeded, PermissionDenied, Unauthenticated
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.protocol.v1 import conveyor_pb2_grpc as pb_grpc

OK = grpc.StatusCode.OK.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
STREAM_METHOD = "/conveyor.v1.TaskService/EnqueueStream"
# The secured server's bucket per token: nearly no refill, room for three requests (opening
# an enqueue stream takes nothing from it: each of its requests is metered as a call).
RATE_LIMIT, RATE_BURST = 0.001, 3


# --- helpers ------------------------------------------------------------------------------


def spec(task_type: str, payload: bytes = b"", **fields: Any) -> pb.TaskSpec:
    """A valid task (a fresh id, a timeout), with `fields` overriding any part of it."""
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": task_type,
        "payload": payload,
        "timeout": Duration(seconds=60),
    }
    values.update(fields)
    return pb.TaskSpec(**{name: value for name, value in values.items() if value is not None})


def batch(task_type: str, count: int) -> pb.EnqueueTasksRequest:
    return pb.EnqueueTasksRequest(tasks=[spec(task_type, b"%d" % n) for n in range(count)])


def ids_of(request: pb.EnqueueTasksRequest) -> list[str]:
    return [task.id for task in request.tasks]


def answer(stream: RawCall) -> pb.EnqueueStreamResponse:
    """The next message on the stream, which must be an answer (not the call's end)."""
    reply = stream.take()
    assert isinstance(reply, pb.EnqueueStreamResponse), reply
    return reply


def answers(stream: RawCall, count: int) -> dict[int, pb.EnqueueStreamResponse]:
    """The next `count` answers by request_id (requests are applied concurrently: any order)."""
    replies = [answer(stream) for _ in range(count)]
    by_id = {reply.request_id: reply for reply in replies}
    assert len(by_id) == count, f"a request_id answered twice: {replies}"
    return by_id


def ended_with(stream: RawCall) -> grpc.RpcError:
    """How the call ended, which must be an error status (not an answer, not OK)."""
    end = stream.take()
    assert isinstance(end, grpc.RpcError), end
    return end


def task(task_type: str, payload: bytes = b"") -> Task:
    """A Task with its id chosen here, so that the test knows it before it is sent."""
    return Task(type=task_type, payload=payload, id=str(uuid.uuid4()))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def rows_async(db: Any, ids: list[str]) -> list[Any]:
    """`rows` from a coroutine (Db runs its own event loop: on a thread of its own)."""
    return await asyncio.to_thread(rows, db, ids)


def rows(db: Any, ids: list[str]) -> list[Any]:
    """The tasks with these ids, with how many times each was recorded as enqueued."""
    return db.fetch(
        "SELECT t.id::text AS id, t.state, t.payload, "
        "(SELECT count(*) FROM conveyor_task_history AS e "
        " WHERE e.task_id = t.id AND e.event = 'enqueued') AS enqueued "
        "FROM conveyor_tasks AS t WHERE t.id = ANY($1::uuid[])",
        ids,
    )


def scrape(http_url: str, token: str | None = None) -> list[Any]:
    """Every sample of a server's /metrics (a server with tokens asks for one)."""
    return metric_samples(http_url, token)


def open_enqueue_streams(http_url: str, token: str | None = None) -> float:
    """The `conveyor_enqueue_streams` gauge."""
    samples = scrape(http_url, token)
    (value,) = [s.value for s in samples if s.name == "conveyor_enqueue_streams"]
    return float(value)


def rpc_counts(http_url: str, token: str | None = None) -> dict[tuple[str, str], float]:
    """Calls by (method, code): requests from `conveyor_rpc_duration_seconds_count`, streams
    (EnqueueStream) from `conveyor_long_rpc_duration_seconds_count`."""
    return {
        (s.labels["method"], s.labels["code"]): s.value
        for s in scrape(http_url, token)
        if s.name
        in ("conveyor_rpc_duration_seconds_count", "conveyor_long_rpc_duration_seconds_count")
    }


def grown(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    """How much each count grew (zeros left out)."""
    return {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key)}


class Tokens:
    """A tokens file an operator edits (as in test_auth.py): each change waits until the
    server has read it."""

    def __init__(self, path: Any) -> None:
        self.path = path
        self.entries: list[TokenEntry] = []
        self.server: Any = None
        self.admin = ""  # a token that may read /metrics, once `secured` made one
        self.path.write_text("")

    def add(self, name: str, role: Role) -> str:
        token, entry = new_token(name, role)
        self.entries.append(entry)
        self._write(entry.token_id, present=True)
        return token

    def serve(self, start_server: Any, **config: Any) -> Any:
        """Start a server reading this file (changes seen within 20 ms), with a bootstrap
        admin token for /metrics; `config` is the rest of its ServerConfig."""
        self.admin = self.add("bootstrap-admin", Role.ADMIN)
        self.server = start_server(
            tokens_file=self.path, tokens_check_interval=timedelta(milliseconds=20), **config
        )
        return self.server

    def remove(self, token: str) -> None:
        token_id = token.split("_")[1]
        self.entries = [entry for entry in self.entries if entry.token_id != token_id]
        self._write(token_id, present=False)

    def _write(self, token_id: str, *, present: bool) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("\n".join(entry.as_toml() for entry in self.entries))
        temporary.replace(self.path)
        if self.server is None:
            return
        tokens = self.server.server.gate.tokens
        wait_for(
            lambda: (tokens.current().entry(token_id) is not None) == present,
            what=f"the server to {'accept' if present else 'drop'} token {token_id}",
        )


@pytest.fixture
def stream(task_stub: pb_grpc.TaskServiceStub) -> Iterator[RawEnqueueStream]:
    opened = RawEnqueueStream(task_stub)
    yield opened
    opened.close()


@pytest.fixture
def first_address_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every AddressRing start at its first address instead of a random one."""
    fake = SimpleNamespace(randrange=lambda _n: 0, uniform=random.uniform)
    monkeypatch.setattr(channel_module, "random", fake)


# --- the raw stream -----------------------------------------------------------------------


class TestAnswers:
    def test_each_request_is_answered_with_its_own_number_and_created_once(
        self, stream: RawEnqueueStream, db: Any
    ) -> None:
        """Three requests at once (numbers the client chose, in no order): each answered OK
        with its number, its ids in order, every task created and queued. The same request
        again is answered with the same ids, none created, and adds no row."""
        requests = {7: batch("es.numbered", 1), 3: batch("es.numbered", 2), 12: batch("es.x", 3)}
        for request_id, request in requests.items():
            stream.send(request_id, request)
        replies = answers(stream, 3)
        assert set(replies) == set(requests)
        for request_id, request in requests.items():
            reply = replies[request_id]
            assert (reply.code, reply.message) == (OK, ""), reply
            assert list(reply.response.task_ids) == ids_of(request)
            assert list(reply.response.created) == [True] * len(request.tasks)
        every_id = [task_id for request in requests.values() for task_id in ids_of(request)]
        stored = rows(db, every_id)
        assert sorted(row["id"] for row in stored) == sorted(every_id)
        assert {row["state"] for row in stored} == {"queued"}
        assert bytes(db.task(ids_of(requests[12])[2])["payload"]) == b"2"

        # 7 was answered, so its number is free again.
        stream.send(7, requests[3])
        again = answer(stream)
        assert again.request_id == 7
        assert again.code == OK
        assert list(again.response.task_ids) == ids_of(requests[3])
        assert list(again.response.created) == [False, False]
        stored = rows(db, every_id)
        assert len(stored) == len(every_id)
        assert {row["enqueued"] for row in stored} == {1}

    def test_a_refused_request_is_answered_as_the_call_would_be_and_the_stream_goes_on(
        self, start_server: Any, db: Any
    ) -> None:
        """Each bad request: answered INVALID_ARGUMENT's number with the very message the
        EnqueueTasks call gives for it, no response, nothing stored; and the stream still
        serves the good request sent after them all."""
        server = start_server(max_batch=3, max_payload_bytes=16)
        bad = {
            "no tasks": pb.EnqueueTasksRequest(),
            "invalid type": pb.EnqueueTasksRequest(tasks=[spec("es.ok"), spec("not a type!")]),
            "over max_batch": batch("es.big", 4),
            "payload over the limit": pb.EnqueueTasksRequest(tasks=[spec("es.p", b"x" * 17)]),
            "no timeout": pb.EnqueueTasksRequest(tasks=[spec("es.t", timeout=None)]),
            "id not a uuid": pb.EnqueueTasksRequest(tasks=[spec("es.id", id="task-1")]),
        }
        channel = grpc.insecure_channel(server.address)
        try:
            stub = pb_grpc.TaskServiceStub(channel)
            expected = {}
            for case, request in bad.items():
                with pytest.raises(grpc.RpcError) as caught:
                    stub.EnqueueTasks(request, timeout=10)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
                expected[case] = caught.value.details()
            stream = RawEnqueueStream(stub)
            try:
                numbers = {case: n for n, case in enumerate(bad, start=1)}
                for case, request in bad.items():
                    stream.send(numbers[case], request)
                replies = answers(stream, len(bad))
                for case, number in numbers.items():
                    reply = replies[number]
                    assert reply.code == INVALID_ARGUMENT, (case, reply)
                    assert reply.message == expected[case], case
                    assert not reply.HasField("response"), case
                good = batch("es.after", 2)
                stream.send(99, good)
                reply = answer(stream)
                assert (reply.request_id, reply.code) == (99, OK), reply
                assert list(reply.response.task_ids) == ids_of(good)
            finally:
                stream.close()
        finally:
            channel.close()
        assert "payload is 17 bytes; the limit is 16" in expected["payload over the limit"]
        assert "4 tasks in one call; the limit is 3" in expected["over max_batch"]
        refused = [task.id for request in bad.values() for task in request.tasks]
        assert rows(db, [task_id for task_id in refused if task_id != "task-1"]) == []
        assert len(rows(db, ids_of(good))) == 2


class TestProtocolErrors:
    def test_request_id_zero_ends_the_stream_invalid_argument(
        self, stream: RawEnqueueStream, db: Any
    ) -> None:
        """After a good request is answered, one numbered 0 ends the call INVALID_ARGUMENT,
        and its tasks are not stored."""
        stream.send(1, batch("es.zero", 1))
        assert answer(stream).code == OK
        unnumbered = batch("es.zero", 1)
        stream.send(0, unnumbered)
        error = ended_with(stream)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id other than 0" in error.details()
        assert rows(db, ids_of(unnumbered)) == []

    def test_a_number_still_unanswered_ends_the_stream_after_answering_the_first(
        self, stream: RawEnqueueStream, db: Any, database_url: str
    ) -> None:
        """Request 5 waits on the database; a second request 5 is a protocol error. The
        first is still answered (OK, stored), then the call ends INVALID_ARGUMENT; the
        second's tasks are not stored."""
        first, second = batch("es.twice", 1), batch("es.twice", 1)
        with writes_blocked(database_url):
            stream.send(5, first)
            stream.send(5, second)
            # Nothing can be answered while the insert waits for the lock.
            assert stream.nothing_within(0.3)
        reply = answer(stream)
        assert (reply.request_id, reply.code) == (5, OK), reply
        assert list(reply.response.task_ids) == ids_of(first)
        error = ended_with(stream)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id 5 is already in use" in error.details()
        assert len(rows(db, ids_of(first))) == 1
        assert rows(db, ids_of(second)) == []

    def test_bytes_that_are_no_message_end_the_stream_invalid_argument(
        self, server: Any, db: Any
    ) -> None:
        """A well-formed request is answered; then bytes that do not decode end the call
        INVALID_ARGUMENT (not UNKNOWN, which grpc.aio would answer by itself)."""
        garbage = b"\x08\x96"  # request_id's tag, then a varint cut short
        with pytest.raises(DecodeError):
            pb.EnqueueStreamRequest.FromString(garbage)
        good = batch("es.bytes", 1)
        channel = grpc.insecure_channel(server.address)
        try:
            undecoded = channel.stream_stream(
                STREAM_METHOD, request_serializer=None, response_deserializer=None
            )
            stream = RawCall(lambda requests: undecoded(requests, timeout=60))
            try:
                stream.put(pb.EnqueueStreamRequest(request_id=1, request=good).SerializeToString())
                reply = pb.EnqueueStreamResponse.FromString(stream.take())
                assert (reply.request_id, reply.code) == (1, OK), reply
                stream.put(garbage)
                error = ended_with(stream)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
                assert "malformed EnqueueStream request" in error.details()
            finally:
                stream.close()
        finally:
            channel.close()
        assert len(rows(db, ids_of(good))) == 1


class TestEnding:
    def test_half_close_ends_the_stream_ok_after_every_answer(
        self, stream: RawEnqueueStream, db: Any
    ) -> None:
        """Requests, then at once a half-close: each request is still answered, then the
        call ends OK, and every task is stored."""
        requests = {n: batch("es.leave", n) for n in (1, 2, 3)}
        for request_id, request in requests.items():
            stream.send(request_id, request)
        stream.half_close()
        replies = answers(stream, 3)
        assert {n: reply.code for n, reply in replies.items()} == {1: OK, 2: OK, 3: OK}
        assert stream.take() is ENDED
        every_id = [task_id for request in requests.values() for task_id in ids_of(request)]
        assert len(rows(db, every_id)) == 6

    def test_a_stopping_server_ends_an_open_stream_ok(self, start_server: Any, db: Any) -> None:
        """A stream left open (no half-close) ends OK when its server stops; what it
        answered before is in the database."""
        stopping = start_server()
        channel = grpc.insecure_channel(stopping.address)
        try:
            stream = RawEnqueueStream(pb_grpc.TaskServiceStub(channel))
            try:
                requests = {1: batch("es.stop", 2), 2: batch("es.stop", 1)}
                for request_id, request in requests.items():
                    stream.send(request_id, request)
                assert {n: r.code for n, r in answers(stream, 2).items()} == {1: OK, 2: OK}
                stopping.stop()
                assert stream.take() is ENDED
            finally:
                stream.close()
        finally:
            channel.close()
        every_id = ids_of(requests[1]) + ids_of(requests[2])
        assert {row["id"] for row in rows(db, every_id)} == set(every_id)


class TestServersWithoutTheStream:
    def test_streams_off_answers_unimplemented(self, start_server: Any, db: Any) -> None:
        """`enqueue_stream=False`: the call ends UNIMPLEMENTED, its request not applied,
        counted under that code; the EnqueueTasks call still works."""
        server = start_server(enqueue_stream=False)
        request = batch("es.off", 1)
        channel = grpc.insecure_channel(server.address)
        try:
            stub = pb_grpc.TaskServiceStub(channel)
            stream = RawEnqueueStream(stub)
            try:
                stream.send(1, request)
                error = ended_with(stream)
            finally:
                stream.close()
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "EnqueueTasks" in error.details()
            assert rows(db, ids_of(request)) == []
            wait_for(
                lambda: rpc_counts(server.http_url).get(("EnqueueStream", "UNIMPLEMENTED")) == 1,
                what="the refusal to be counted",
            )
            assert stub.EnqueueTasks(request, timeout=10).created == [True]
        finally:
            channel.close()

    async def test_an_async_client_falls_back_to_calls(self, start_server: Any, db: Any) -> None:
        """An AsyncClient against that server enqueues all the same, as calls; it asks for
        the stream once, then uses calls to that address for STREAM_RETRY_AFTER."""
        server = start_server(enqueue_stream=False)
        async with AsyncClient(server.address) as client:
            first = await client.enqueue_tasks(
                [Task(type="es.fallback", payload=b"1") for _ in range(3)]
            )
            now = asyncio.get_running_loop().time()
            until = client._calls_only_until.get(server.address, 0.0)
            assert now < until <= now + STREAM_RETRY_AFTER
            second = await client.enqueue_task(Task(type="es.fallback", payload=b"2"))
        stored = await rows_async(db, [*first, second])
        assert len(stored) == 4
        assert {row["enqueued"] for row in stored} == {1}
        counts = rpc_counts(server.http_url)
        assert counts.get(("EnqueueStream", "UNIMPLEMENTED")) == 1, counts
        assert counts.get(("EnqueueTasks", "OK")) == 2, counts


class TestMetrics:
    async def test_the_open_streams_gauge_follows_an_async_client(self, server: Any) -> None:
        """One stream for all of a client's enqueues: the gauge is 1 while it is open (and
        after many enqueues), 0 once the client closes, and the stream is then counted
        once as EnqueueStream, OK."""
        assert open_enqueue_streams(server.http_url) == 0
        client = AsyncClient(server.address)
        try:
            await client.enqueue_task(Task(type="es.gauge"))
            assert open_enqueue_streams(server.http_url) == 1
            for n in range(5):
                await client.enqueue_task(Task(type="es.gauge", payload=b"%d" % n))
            await asyncio.gather(*(client.enqueue_task(Task(type="es.gauge")) for _ in range(8)))
            assert open_enqueue_streams(server.http_url) == 1
            assert not any(method == "EnqueueStream" for method, _ in rpc_counts(server.http_url))
        finally:
            await client.close()
        await async_wait_for(
            lambda: open_enqueue_streams(server.http_url) == 0, what="the gauge to fall to 0"
        )
        counts = rpc_counts(server.http_url)
        streams = {key: value for key, value in counts.items() if key[0] == "EnqueueStream"}
        # Closing half-closes and the server ends the call OK: no CANCELLED for alerts to
        # see on every client shutdown.
        assert streams == {("EnqueueStream", "OK"): 1}, streams

    def test_each_request_is_counted_as_an_enqueue_tasks_call_under_its_code(
        self, server: Any, stream: RawEnqueueStream
    ) -> None:
        """Four good requests and two refused: EnqueueTasks OK grows by 4, INVALID_ARGUMENT
        by 2, nothing else; the stream is counted once, as OK, when it ends."""
        before = rpc_counts(server.http_url)
        for request_id in range(1, 5):
            stream.send(request_id, batch("es.counted", request_id))
        stream.send(5, pb.EnqueueTasksRequest())
        stream.send(6, batch("es.counted", 1 + 1000))  # over the default max_batch of 1000
        codes = {n: reply.code for n, reply in answers(stream, 6).items()}
        assert codes == {1: OK, 2: OK, 3: OK, 4: OK, 5: INVALID_ARGUMENT, 6: INVALID_ARGUMENT}
        expected = {("EnqueueTasks", "OK"): 4, ("EnqueueTasks", "INVALID_ARGUMENT"): 2}
        wait_for(
            lambda: grown(before, rpc_counts(server.http_url)) == expected,
            what=f"the requests to be counted as {expected}",
        )
        stream.half_close()
        assert stream.take() is ENDED
        expected[("EnqueueStream", "OK")] = 1
        wait_for(
            lambda: grown(before, rpc_counts(server.http_url)) == expected,
            what="the stream to be counted",
        )


# --- authentication -----------------------------------------------------------------------


@pytest.fixture
def tokens(tmp_path: Any) -> Tokens:
    return Tokens(tmp_path / "tokens.toml")


@pytest.fixture
def secured(start_server: Any, tokens: Tokens) -> Any:
    """A server that requires tokens (its tokens file is `tokens`)."""
    return tokens.serve(start_server, rate_limit=RATE_LIMIT, rate_burst=RATE_BURST)


@pytest.fixture
def secured_stub(secured: Any) -> Iterator[pb_grpc.TaskServiceStub]:
    channel = grpc.insecure_channel(secured.address)
    yield pb_grpc.TaskServiceStub(channel)
    channel.close()


class TestAuthentication:
    async def test_a_producer_enqueues_through_the_stream(
        self, secured: Any, tokens: Tokens, db: Any
    ) -> None:
        """A producer token: the AsyncClient's enqueues go on its stream and are stored."""
        producer = tokens.add("app", Role.PRODUCER)
        async with AsyncClient(secured.address, token=producer) as client:
            ids = await client.enqueue_tasks([Task(type="es.auth", payload=b"a") for _ in range(3)])
            stream = client._enqueue_streams[secured.address]
            assert not stream.ended
            assert open_enqueue_streams(secured.http_url, tokens.admin) == 1
        assert len(await rows_async(db, ids)) == 3
        counts = rpc_counts(secured.http_url, tokens.admin)
        assert counts.get(("EnqueueTasks", "OK")) == 1, counts  # one request, no call

    async def test_a_worker_token_is_refused_the_stream(
        self, secured: Any, tokens: Tokens, secured_stub: pb_grpc.TaskServiceStub, db: Any
    ) -> None:
        """A worker token may not enqueue: the raw stream ends PERMISSION_DENIED, and the
        AsyncClient raises PermissionDenied, storing nothing."""
        worker = tokens.add("fleet", Role.WORKER)
        request = batch("es.denied", 1)
        stream = RawEnqueueStream(secured_stub, metadata=bearer(worker))
        try:
            stream.send(1, request)
            error = ended_with(stream)
        finally:
            stream.close()
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "enqueue" in error.details()
        refused = task("es.denied")
        async with AsyncClient(secured.address, token=worker) as client:
            with pytest.raises(PermissionDenied, match="enqueue"):
                await client.enqueue_task(refused)
        assert await rows_async(db, [*ids_of(request), refused.id]) == []

    def test_revoking_the_token_refuses_the_next_request_and_ends_the_stream(
        self, tokens: Tokens, secured_stub: pb_grpc.TaskServiceStub, db: Any
    ) -> None:
        """Each request is admitted on its own: once the token is gone, the next request
        on the stream opened with it is answered UNAUTHENTICATED, its tasks are not stored,
        and the stream then ends OK without a half-close. It used to stay open: each
        refused request restarted its idle clock, and a revoked token held its call slots
        for as long as it liked (found by a review)."""
        producer = tokens.add("app", Role.PRODUCER)
        stream = RawEnqueueStream(secured_stub, metadata=bearer(producer))
        try:
            accepted = batch("es.revoked", 1)
            stream.send(1, accepted)
            assert answer(stream).code == OK
            tokens.remove(producer)
            refused = batch("es.revoked", 1)
            stream.send(2, refused)
            reply = answer(stream)
            assert reply.request_id == 2
            assert reply.code == grpc.StatusCode.UNAUTHENTICATED.value[0], reply
            assert "not valid" in reply.message, reply.message
            assert stream.take() is ENDED
        finally:
            stream.close()
        assert len(rows(db, ids_of(accepted))) == 1
        assert rows(db, ids_of(refused)) == []

    async def test_an_async_client_raises_unauthenticated_once_its_token_is_revoked(
        self, secured: Any, tokens: Tokens, db: Any
    ) -> None:
        """The AsyncClient's next enqueue after the revocation raises Unauthenticated, and
        so does the one after it, on a stream the server refuses at once."""
        producer = tokens.add("app", Role.PRODUCER)
        async with AsyncClient(secured.address, token=producer) as client:
            first = await client.enqueue_task(Task(type="es.revoked"))
            await asyncio.to_thread(tokens.remove, producer)
            refused = [task("es.revoked"), task("es.revoked")]
            for each in refused:
                with pytest.raises(Unauthenticated):
                    await client.enqueue_task(each)
        assert len(await rows_async(db, [first])) == 1
        assert await rows_async(db, [each.id for each in refused]) == []


class TestRateLimit:
    def test_the_rate_limit_refuses_a_request_not_the_stream(
        self, tokens: Tokens, secured_stub: pb_grpc.TaskServiceStub
    ) -> None:
        """A bucket of three: three requests pass, the fourth is answered RESOURCE_EXHAUSTED
        with the limiter's message; the stream stays open and ends OK on a half-close."""
        producer = tokens.add("app", Role.PRODUCER)
        stream = RawEnqueueStream(secured_stub, metadata=bearer(producer))
        try:
            codes = []
            for request_id in (1, 2, 3, 4):
                stream.send(request_id, batch("es.metered", 1))
                reply = answer(stream)
                assert reply.request_id == request_id
                codes.append(reply.code)
            assert codes == [OK, OK, OK, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
            assert reply.message.startswith("request rate limit"), reply.message
            stream.half_close()
            assert stream.take() is ENDED
        finally:
            stream.close()

    async def test_an_async_client_waits_then_raises_limit_exceeded(
        self, secured: Any, tokens: Tokens, db: Any
    ) -> None:
        """The same bucket for an AsyncClient: three enqueues pass on its stream; the fourth
        is refused as backpressure whose "retry in" is past the budget, so it is raised as
        LimitExceeded at once, with the wait; the stream was not ended by it."""
        producer = tokens.add("app", Role.PRODUCER)
        retry = RetryPolicy(total_timeout=timedelta(seconds=1))
        async with AsyncClient(secured.address, token=producer, retry=retry) as client:
            passed = [await client.enqueue_task(task("es.metered")) for _ in range(3)]
            stream = client._enqueue_streams[secured.address]
            refused = task("es.metered")
            with pytest.raises(LimitExceeded, match="request rate limit") as caught:
                await client.enqueue_task(refused)
            assert caught.value.retry_in > retry.total_timeout.total_seconds()
            assert client._enqueue_streams[secured.address] is stream
            assert not stream.ended
        assert len(await rows_async(db, passed)) == 3
        assert await rows_async(db, [refused.id]) == []
        refusals = rpc_counts(secured.http_url, tokens.admin)[
            ("EnqueueTasks", "RESOURCE_EXHAUSTED")
        ]
        assert refusals == 1  # no retry that was sure to be refused


# --- streams per token ---------------------------------------------------------------------

STREAMS_PER_TOKEN = 2


@pytest.fixture
def capped(start_server: Any, tokens: Tokens) -> Any:
    """A server with tokens that lets one token hold two enqueue streams (no rate limit)."""
    return tokens.serve(
        start_server, rate_limit=None, max_enqueue_streams_per_token=STREAMS_PER_TOKEN
    )


def opened(stub: pb_grpc.TaskServiceStub, token: str, task_type: str) -> RawEnqueueStream:
    """A raw stream with `token` that the server accepted: its first request was answered."""
    stream = RawEnqueueStream(stub, metadata=bearer(token))
    stream.send(1, batch(task_type, 1))
    assert answer(stream).code == OK
    return stream


def stream_refusals(http_url: str, token: str) -> float:
    """`conveyor_limit_refusals_total{limit="enqueue_streams"}` (0 before the first)."""
    return sum(
        sample.value
        for sample in scrape(http_url, token)
        if sample.name == "conveyor_limit_refusals_total"
        and sample.labels["limit"] == "enqueue_streams"
    )


class TestStreamsPerToken:
    """Open streams hold server slots that requests' metering never sees: with tokens, one
    token holds at most `max_enqueue_streams_per_token` on a server, and a client refused
    one enqueues with calls instead."""

    def test_a_token_past_its_cap_is_refused_a_stream_and_others_are_not(
        self, capped: Any, tokens: Tokens, db: Any
    ) -> None:
        """Two streams with one token are accepted; the third ends UNIMPLEMENTED at the door
        (what every client release takes as "enqueue with calls"), naming the limit, and
        stores nothing; another token still opens one; once one of the two ends, the first
        token opens a stream again."""
        app, other = tokens.add("app", Role.PRODUCER), tokens.add("other", Role.PRODUCER)
        channel = grpc.insecure_channel(capped.address)
        stub = pb_grpc.TaskServiceStub(channel)
        streams = [opened(stub, app, "es.capped") for _ in range(STREAMS_PER_TOKEN)]
        try:
            refused_request = batch("es.capped", 1)
            refused = RawEnqueueStream(stub, metadata=bearer(app))
            refused.send(1, refused_request)
            error = ended_with(refused)
            refused.close()
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED
            assert error.details().startswith("enqueue stream limit"), error.details()
            assert f"{STREAMS_PER_TOKEN} enqueue streams open" in error.details()
            assert rows(db, ids_of(refused_request)) == []
            assert stream_refusals(capped.http_url, tokens.admin) == 1

            streams.append(opened(stub, other, "es.capped"))
            streams[0].half_close()
            assert streams[0].take() is ENDED
            wait_for(
                lambda: open_enqueue_streams(capped.http_url, tokens.admin) == STREAMS_PER_TOKEN,
                what="the ended stream to be counted out",
            )
            streams.append(opened(stub, app, "es.capped"))
            assert stream_refusals(capped.http_url, tokens.admin) == 1
        finally:
            for stream in streams:
                stream.close()
            channel.close()

    async def test_an_async_client_refused_a_stream_enqueues_with_calls(
        self, capped: Any, tokens: Tokens, db: Any
    ) -> None:
        """With the token's two streams held elsewhere, an AsyncClient's enqueues succeed
        as EnqueueTasks calls, and it does not ask for a stream again at each enqueue."""
        app = tokens.add("app", Role.PRODUCER)
        channel = grpc.insecure_channel(capped.address)
        stub = pb_grpc.TaskServiceStub(channel)
        held = [opened(stub, app, "es.capped") for _ in range(STREAMS_PER_TOKEN)]
        try:
            async with AsyncClient(capped.address, token=app) as client:
                ids = [await client.enqueue_task(task("es.capped")) for _ in range(3)]
                assert client._calls_only_until[capped.address] > 0
                assert client._enqueue_streams[capped.address].ended
        finally:
            for stream in held:
                stream.close()
            channel.close()
        assert [row["state"] for row in await rows_async(db, ids)] == ["queued"] * 3
        assert stream_refusals(capped.http_url, tokens.admin) == 1

    def test_a_blocking_client_refused_a_stream_enqueues_with_calls(
        self, capped: Any, tokens: Tokens, db: Any
    ) -> None:
        """The same for the blocking `Client`."""
        app = tokens.add("app", Role.PRODUCER)
        channel = grpc.insecure_channel(capped.address)
        stub = pb_grpc.TaskServiceStub(channel)
        held = [opened(stub, app, "es.capped") for _ in range(STREAMS_PER_TOKEN)]
        try:
            with Client(capped.address, token=app) as client:
                ids = [client.enqueue_task(task("es.capped")) for _ in range(3)]
                assert client._calls_only_until[capped.address] > 0
        finally:
            for stream in held:
                stream.close()
            channel.close()
        assert [row["state"] for row in rows(db, ids)] == ["queued"] * 3
        assert stream_refusals(capped.http_url, tokens.admin) == 1

    def test_without_tokens_streams_are_not_capped(self, start_server: Any) -> None:
        """With authentication off every caller is the same anonymous admin: a cap would be
        shared by every application, so there is none."""
        server = start_server(max_enqueue_streams_per_token=1)
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.TaskServiceStub(channel)
        streams = []
        try:
            for _ in range(3):
                stream = RawEnqueueStream(stub)
                streams.append(stream)
                stream.send(1, batch("es.uncapped", 1))
                assert answer(stream).code == OK
            assert open_enqueue_streams(server.http_url) == 3
        finally:
            for stream in streams:
                stream.close()
            channel.close()


# --- the AsyncClient when servers go away -------------------------------------------------


class TestAsyncClientResilience:
    async def test_a_restarted_server_gets_a_new_stream(self, start_server: Any, db: Any) -> None:
        """The client's stream ends with its server; a server started on the same address
        and database takes the next enqueues on a new stream; every task is stored once."""
        old = start_server()
        address = old.address
        async with AsyncClient(address) as client:
            before = await client.enqueue_tasks(
                [Task(type="es.restart", payload=b"%d" % n) for n in range(3)]
            )
            stream = client._enqueue_streams[address]
            await asyncio.to_thread(old.stop)
            await async_wait_for(lambda: stream.ended, what="the client to see the stream end")
            new = await asyncio.to_thread(start_server, grpc_listen=address)
            after = await client.enqueue_tasks(
                [Task(type="es.restart", payload=b"%d" % n) for n in range(3, 6)]
            )
            renewed = client._enqueue_streams[address]
            assert renewed is not stream
            assert not renewed.ended
        ids = before + after
        stored = {row["id"]: row for row in await rows_async(db, ids)}
        assert sorted(stored) == sorted(ids)
        assert [bytes(stored[task_id]["payload"]) for task_id in ids] == [
            b"%d" % n for n in range(6)
        ]
        assert {row["enqueued"] for row in stored.values()} == {1}
        assert rpc_counts(new.http_url).get(("EnqueueTasks", "OK")) == 1

    async def test_enqueues_survive_their_server_stopping_under_them(
        self, start_server: Any, db: Any, first_address_first: None
    ) -> None:
        """Four producers enqueue one task at a time through one client; server A stops
        halfway. Every enqueue returns, the rest go to B on a stream of their own, and each
        task is stored exactly once with its payload."""
        server_a, server_b = start_server(), start_server()
        per_producer, stop_after = 30, 40
        returned: list[str] = []
        sent: dict[str, bytes] = {}
        stopper = threading.Thread(target=server_a.stop, name="stop-server-a")
        retry = RetryPolicy(call_timeout=timedelta(seconds=5), total_timeout=timedelta(seconds=30))
        async with AsyncClient([server_a.address, server_b.address], retry=retry) as client:
            assert client._ring.current == server_a.address

            async def produce(producer: int) -> None:
                for n in range(per_producer):
                    if len(returned) >= stop_after and stopper.ident is None:
                        stopper.start()
                    one = task("es.failover", b"%d-%d" % (producer, n))
                    sent[str(one.id)] = one.payload
                    returned.append(await client.enqueue_task(one))

            try:
                await asyncio.gather(*(produce(p) for p in range(4)))
            finally:
                if stopper.ident is not None:
                    await asyncio.to_thread(stopper.join, 30)
            assert stopper.ident is not None
            assert client._ring.current == server_b.address
            assert not client._enqueue_streams[server_b.address].ended
        assert len(returned) == len(set(returned)) == 4 * per_producer
        assert set(returned) == set(sent)
        stored = await rows_async(db, returned)
        assert len(stored) == len(returned)
        assert {row["id"]: bytes(row["payload"]) for row in stored} == sent
        assert {row["enqueued"] for row in stored} == {1}
        assert rpc_counts(server_b.http_url).get(("EnqueueTasks", "OK"), 0) >= 1


class TestForgottenClients:
    def test_a_sync_client_dropped_unclosed_leaves_no_stream_or_thread(self, server: Any) -> None:
        """A `Client` made per web request and never closed must not leave its stream's
        call and reader thread behind: once the client is collected, both end."""
        client = Client(server.address)
        client.enqueue_task(Task(type="es.forgotten"))
        assert open_enqueue_streams(server.http_url) == 1
        assert any(thread.name == "conveyor-enqueue-stream" for thread in threading.enumerate())
        del client
        gc.collect()
        wait_for(lambda: open_enqueue_streams(server.http_url) == 0, what="the stream to end")
        wait_for(
            lambda: (
                not any(
                    thread.name == "conveyor-enqueue-stream" for thread in threading.enumerate()
                )
            ),
            what="the reader thread to end",
        )


class TestRefusalsAtTheDoor:
    """grpc/grpc#36066: a client write racing the server's end of a call turns the call's
    status into INTERNAL 'Internal error from Core'. Clients write nothing before the
    server accepts the stream, so a refusal at the door always arrives as itself."""

    async def test_every_async_client_falls_back_from_a_server_without_the_stream(
        self, start_server: Any
    ) -> None:
        """A hundred fresh AsyncClients, one enqueue each, against a server with streams
        off: every one enqueues (UNIMPLEMENTED, then a call). Before clients waited for the
        server's acceptance, one in ten to one in two raised that INTERNAL."""
        server = start_server(enqueue_stream=False)
        outcomes: dict[str, int] = {}
        for _ in range(100):
            async with AsyncClient(server.address) as client:
                try:
                    await client.enqueue_task(task("es.race"))
                    outcome = "enqueued"
                except ConveyorError as exc:
                    outcome = str(exc)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert outcomes == {"enqueued": 100}

    def test_every_sync_client_falls_back_from_a_server_without_the_stream(
        self, start_server: Any
    ) -> None:
        """The same for the blocking `Client`, whose stream is fed by gRPC's own thread."""
        server = start_server(enqueue_stream=False)
        outcomes: dict[str, int] = {}
        for _ in range(100):
            with Client(server.address) as client:
                try:
                    client.enqueue_task(task("es.race"))
                    outcome = "enqueued"
                except ConveyorError as exc:
                    outcome = str(exc)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert outcomes == {"enqueued": 100}


# --- idle streams ---------------------------------------------------------------------------

IDLE_AFTER = timedelta(seconds=0.5)


class TestIdleStreams:
    """A stream with no request for `enqueue_stream_idle` is ended OK by the server, and
    the clients open a new one with their next enqueue: idle clients give their calls back."""

    def test_an_idle_stream_ends_ok_once_idle_for_the_setting_and_not_while_used(
        self, start_server: Any, db: Any
    ) -> None:
        idle_server = start_server(enqueue_stream_idle=IDLE_AFTER)
        channel = grpc.insecure_channel(idle_server.address)
        try:
            stream = RawEnqueueStream(pb_grpc.TaskServiceStub(channel))
            try:
                # Requests more often than the idle setting, for three times as long: each is
                # answered, and the stream stays open throughout.
                began = time.monotonic()
                request_id = 0
                while time.monotonic() - began < 3 * IDLE_AFTER.total_seconds():
                    request_id += 1
                    stream.send(request_id, batch("es.idle", 1))
                    assert answer(stream).code == OK
                    last_answer_at = time.monotonic()
                    assert stream.nothing_within(IDLE_AFTER.total_seconds() / 3)
                assert stream.take() is ENDED
                quiet_for = time.monotonic() - last_answer_at
            finally:
                stream.close()
        finally:
            channel.close()
        assert request_id >= 4
        # Ended for being idle: not before the setting, and well before the take's timeout.
        assert IDLE_AFTER.total_seconds() * 0.9 <= quiet_for < 5, quiet_for
        counts = rpc_counts(idle_server.http_url)
        assert counts[("EnqueueStream", "OK")] == 1
        assert counts[("EnqueueTasks", "OK")] == request_id

    async def test_an_async_client_opens_a_new_stream_after_an_idle_end(
        self, start_server: Any, db: Any
    ) -> None:
        idle_server = start_server(enqueue_stream_idle=IDLE_AFTER)
        async with AsyncClient(idle_server.address) as client:
            first = await client.enqueue_task(Task(type="es.idle"))
            await async_wait_for(
                lambda: open_enqueue_streams(idle_server.http_url) == 0,
                what="the server to end the idle stream",
            )
            second = await client.enqueue_task(Task(type="es.idle"))
            assert open_enqueue_streams(idle_server.http_url) == 1
        assert {row["id"] for row in await rows_async(db, [first, second])} == {first, second}
        # Two streams, each ended OK (the second by the client's close); no request failed
        # and none fell back to a call.
        await async_wait_for(
            lambda: rpc_counts(idle_server.http_url).get(("EnqueueStream", "OK")) == 2,
            what="both streams to be counted",
        )
        counts = rpc_counts(idle_server.http_url)
        assert counts[("EnqueueTasks", "OK")] == 2
        assert set(counts) == {("EnqueueStream", "OK"), ("EnqueueTasks", "OK")}, counts

    @pytest.mark.parametrize("kind", ["async", "sync"])
    def test_an_enqueue_racing_the_idle_end_goes_again_at_once_and_counts_as_no_failure(
        self, start_server: Any, db: Any, monkeypatch: pytest.MonkeyPatch, kind: str
    ) -> None:
        """A producer that enqueues about once per idle period sends some requests just as
        the server ends the stream. Each goes again at once on a new stream: the caller
        sees no error, and the retry loop no failure (so no backoff, no breaker mark, even
        with a breaker that opens on the first failure)."""
        failures: list[str] = []
        original = channel_module.RetryLoop.failed

        def counting(loop: Any, address: str, error: grpc.RpcError) -> None:
            failures.append(f"{error.code()}: {error.details()}")
            original(loop, address, error)

        monkeypatch.setattr(channel_module.RetryLoop, "failed", counting)
        idle = 0.3
        idle_server = start_server(enqueue_stream_idle=timedelta(seconds=idle))
        strict = BreakerPolicy(failure_threshold=1, reset_timeout=timedelta(seconds=30))
        # Around the idle end, a little before and after: the pacing is the workload.
        pauses = [idle + offset / 1000 for offset in (-2, -1, 0, 1, 2, 3) * 2]
        if kind == "async":

            async def produce() -> list[str]:
                async with AsyncClient(idle_server.address, breaker=strict) as client:
                    ids = [await client.enqueue_task(Task(type="es.race"))]
                    for pause in pauses:
                        await asyncio.sleep(pause)
                        ids.append(await client.enqueue_task(Task(type="es.race")))
                    return ids

            ids = asyncio.run(produce())
        else:
            with Client(idle_server.address, breaker=strict) as client:
                ids = [client.enqueue_task(Task(type="es.race"))]
                for pause in pauses:
                    time.sleep(pause)
                    ids.append(client.enqueue_task(Task(type="es.race")))
        assert failures == []
        assert {row["id"] for row in rows(db, ids)} == set(ids)
        # The idle end did happen between enqueues, many times over.
        wait_for(
            lambda: rpc_counts(idle_server.http_url).get(("EnqueueStream", "OK"), 0) >= 6,
            what="the idle streams to be counted",
        )

    def test_a_sync_client_opens_a_new_stream_after_an_idle_end(
        self, start_server: Any, db: Any
    ) -> None:
        idle_server = start_server(enqueue_stream_idle=IDLE_AFTER)
        with Client(idle_server.address) as client:
            first = client.enqueue_task(Task(type="es.idle"))
            wait_for(
                lambda: open_enqueue_streams(idle_server.http_url) == 0,
                what="the server to end the idle stream",
            )
            second = client.enqueue_task(Task(type="es.idle"))
            assert open_enqueue_streams(idle_server.http_url) == 1
        assert {row["id"] for row in rows(db, [first, second])} == {first, second}
        wait_for(
            lambda: rpc_counts(idle_server.http_url).get(("EnqueueStream", "OK")) == 2,
            what="both streams to be counted",
        )
        counts = rpc_counts(idle_server.http_url)
        assert set(counts) == {("EnqueueStream", "OK"), ("EnqueueTasks", "OK")}, counts
