"""The producer clients under misuse and odd load: what each caller sees, against real servers.

One caller's request too large for a server must fail that caller only, never the other
threads or coroutines sharing the client's enqueue stream. An `enqueue_tasks` of several
requests that fails half way names the caller's task and says which tasks exist. A
payload too large for the server's messages is an InvalidTask in plain words, like one over
its payload limit. A closed `Client` stays closed, a forked child is told at once that it
cannot use its parent's client, and bad arguments get typed errors.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from conveyor import AsyncClient, Client, Task, TaskState
from conveyor.breaker import BreakerPolicy
from conveyor.client.channel import RetryPolicy
from conveyor.client.core import enqueue_request
from conveyor.client.enqueue_stream import (
    BlockingEnqueueStream,
    EnqueueRoute,
    StreamEnded,
)
from conveyor.errors import (
    ConfigError,
    ConveyorError,
    InvalidTask,
    ServerUnavailable,
)
from conveyor.protocol.limits import MIN_SERVER_MESSAGE_BYTES, PEER_MESSAGE_BYTES
from tests.helpers import Db, async_wait_for, free_port, wait_for

# A payload over every server's smallest message limit (16 MiB), under the client's own.
OVERSIZED = 20 * 1024 * 1024
SMALL_THREADS = 4
BIG_ATTEMPTS = 3


def small_batch() -> list[Task]:
    # Large enough that requests stay in flight on the stream while the big one goes.
    return [Task(type="misuse.small", payload=b"p" * 100_000) for _ in range(20)]


def small_request() -> Any:
    return enqueue_request([Task(type="misuse.small")])


def stored(db: Db, task_type: str) -> list[str]:
    rows = db.fetch("SELECT id::text FROM conveyor_tasks WHERE type = $1", task_type)
    return [row[0] for row in rows]


def assert_each_acknowledged_task_stored_once(db: Db, acked: list[str]) -> None:
    in_db = stored(db, "misuse.small")
    assert len(acked) == len(set(acked)), "an id was acknowledged twice"
    assert sorted(in_db) == sorted(acked), "stored tasks differ from acknowledged ones"


class TestOversizedEnqueueBesideOthers:
    """Used to: the 20 MiB request went on the shared enqueue stream, the server's gRPC
    ended the whole call with RESOURCE_EXHAUSTED, and the other callers' requests on it
    failed with LimitExceeded "Received message larger than max" about a message that was
    not theirs, some of them committed all the same."""

    def test_sync_only_the_oversized_caller_fails(self, server: Any, db: Db) -> None:
        with Client(server.address) as client:
            client.enqueue_task(Task(type="misuse.warm"))
            stop = threading.Event()
            acked: list[str] = []
            failures: list[str] = []
            rounds = collections.Counter[int]()

            def small(n: int) -> None:
                while not stop.is_set():
                    try:
                        acked.extend(client.enqueue_tasks(small_batch()))
                    except ConveyorError as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    rounds[n] += 1

            threads = [threading.Thread(target=small, args=(n,)) for n in range(SMALL_THREADS)]
            for thread in threads:
                thread.start()
            try:
                wait_for(lambda: len(rounds) == SMALL_THREADS, what="every thread enqueuing")
                big_errors = []
                for _ in range(BIG_ATTEMPTS):
                    with pytest.raises(InvalidTask) as caught:
                        client.enqueue_task(Task(type="misuse.big", payload=b"x" * OVERSIZED))
                    big_errors.append(caught.value.message)
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
        assert failures == []
        assert all(f"{MIN_SERVER_MESSAGE_BYTES} bytes" in message for message in big_errors)
        assert_each_acknowledged_task_stored_once(db, acked)
        assert stored(db, "misuse.big") == []

    async def test_async_only_the_oversized_caller_fails(self, server: Any, db: Db) -> None:
        async with AsyncClient(server.address) as client:
            await client.enqueue_task(Task(type="misuse.warm"))
            stop = asyncio.Event()
            acked: list[str] = []
            failures: list[str] = []
            started = asyncio.Event()

            async def small() -> None:
                while not stop.is_set():
                    try:
                        acked.extend(await client.enqueue_tasks(small_batch()))
                    except ConveyorError as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    started.set()

            runners = [asyncio.create_task(small()) for _ in range(SMALL_THREADS)]
            try:
                await asyncio.wait_for(started.wait(), 20)
                for _ in range(BIG_ATTEMPTS):
                    with pytest.raises(InvalidTask, match=f"{MIN_SERVER_MESSAGE_BYTES} bytes"):
                        await client.enqueue_task(Task(type="misuse.big", payload=b"x" * OVERSIZED))
            finally:
                stop.set()
                await asyncio.gather(*runners)
        assert failures == []
        await asyncio.to_thread(assert_each_acknowledged_task_stored_once, db, acked)

    def test_requests_left_by_a_stream_broken_by_another_are_sent_again(
        self, server: Any, db: Db
    ) -> None:
        """The second half of the fix: should a message break the stream all the same
        (here written on the client's stream directly), the requests it leaves unanswered
        are sent again, and each is stored once."""
        big_request = enqueue_request([Task(type="misuse.big", payload=b"x" * OVERSIZED)])
        with Client(server.address) as client:
            client.enqueue_task(Task(type="misuse.warm"))
            stop = threading.Event()
            acked: list[str] = []
            failures: list[str] = []
            rounds = collections.Counter[int]()

            def small(n: int) -> None:
                while not stop.is_set():
                    try:
                        acked.extend(client.enqueue_tasks(small_batch()))
                    except ConveyorError as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    rounds[n] += 1

            threads = [threading.Thread(target=small, args=(n,)) for n in range(SMALL_THREADS)]
            for thread in threads:
                thread.start()
            breaks = 0
            try:
                wait_for(lambda: len(rounds) == SMALL_THREADS, what="every thread enqueuing")
                while breaks < BIG_ATTEMPTS:
                    stream = wait_for(
                        lambda: next(
                            (s for s in client._enqueue_streams.values() if not s.ended), None
                        ),
                        what="an open enqueue stream",
                    )
                    with pytest.raises(StreamEnded):
                        stream.send(big_request, 20)
                    breaks += 1
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
        assert failures == []
        assert_each_acknowledged_task_stored_once(db, acked)


class TestStreamBrokenAgain:
    """Used to: a stream that broke (a non-transient end after the server accepted it)
    failed its requests with a transient UNAVAILABLE. After the one resend on a new stream,
    the retry loop sent them again on new streams until its budget ran out: a request that
    breaks every stream broke the one the other callers share each time, marked the
    server unreachable, and its caller got ServerUnavailable or CircuitOpen instead of the
    real status. Now a request whose stream breaks again goes as a call of its own.

    No public call puts a request that breaks the stream on it (one that large goes as a
    call), so the streams are broken as in the test above, by writing that request on a
    stream of the client's directly; the attempt's route (EnqueueRoute) and retry loop
    (RetryLoop) then judge what the real streams raised, as `Client._enqueue_once` does."""

    def test_a_request_whose_stream_breaks_again_goes_as_a_call(self, server: Any, db: Db) -> None:
        breaking = enqueue_request([Task(type="misuse.big", payload=b"x" * OVERSIZED)])
        request = small_request()
        with Client(server.address) as client:
            address = server.address
            route = EnqueueRoute(client._calls_only_until, address, time.monotonic(), 20, request)
            for _ in range(2):
                assert route.on_stream()
                stream = BlockingEnqueueStream(client._channel(address), client._metadata)
                with pytest.raises(StreamEnded) as ended:
                    stream.send(breaking, 20)
                stream.close()
                assert ended.value.broken
                route.stream_ended(ended.value, stream_was_new=True)
            # Not a third stream, nor a failure for the retry loop: a call of its own, whose
            # answer is the server's about this request alone.
            assert not route.on_stream()
            response = client._stub(address).EnqueueTasks(request, timeout=20)
            assert stored(db, "misuse.small") == list(response.task_ids)
            assert client._ring.breakers[address]._failures == 0


class TestEnqueueOfSeveralRequests:
    """Used to: tasks[1500] was reported as tasks[500], and nothing said that the first
    1,000 tasks had been created."""

    @staticmethod
    def tasks() -> list[Task]:
        tasks = [Task(type="misuse.part") for _ in range(2500)]
        tasks[1500] = Task(type="misuse.part", payload=b"x" * (1024 * 1024 + 1))
        return tasks

    def test_sync_error_names_the_callers_index_and_the_committed_ids(
        self, server: Any, db: Db
    ) -> None:
        with (
            Client(server.address) as client,
            pytest.raises(InvalidTask, match=r"^tasks\[1500\]: payload is") as caught,
        ):
            client.enqueue_tasks(self.tasks())
        committed = caught.value.committed_ids
        assert len(committed) == 1000
        assert sorted(stored(db, "misuse.part")) == sorted(committed)

    async def test_async_error_names_the_callers_index_and_the_committed_ids(
        self, server: Any, db: Db
    ) -> None:
        async with AsyncClient(server.address) as client:
            with pytest.raises(InvalidTask, match=r"^tasks\[1500\]: payload is") as caught:
                await client.enqueue_tasks(self.tasks())
        committed = caught.value.committed_ids
        assert len(committed) == 1000
        in_db = await asyncio.to_thread(stored, db, "misuse.part")
        assert sorted(in_db) == sorted(committed)


class TestPayloadOverMessageLimits:
    """Used to: LimitExceeded "SERVER: Received message larger than max (...)" for 20 MiB
    and "CLIENT: Sent message larger than max" for 70 MiB, where 1 MiB + 1 byte gave an
    InvalidTask naming the payload limit."""

    def test_over_the_servers_message_limit(self, server: Any) -> None:
        with Client(server.address) as client, pytest.raises(InvalidTask) as caught:
            client.enqueue_task(Task(type="misuse.big", payload=b"x" * OVERSIZED))
        message = caught.value.message
        assert f"over the server's message limit of {MIN_SERVER_MESSAGE_BYTES} bytes" in message
        assert "max_payload_bytes" in message

    def test_over_the_clients_message_limit_is_refused_before_sending(self, server: Any) -> None:
        with Client(server.address) as client:
            with pytest.raises(InvalidTask, match=f"at most {PEER_MESSAGE_BYTES} bytes"):
                client.enqueue_task(Task(type="misuse.big", payload=b"x" * (70 * 1024 * 1024)))
            assert client._channels == {}  # nothing went to the server


class TestClosedClient:
    """Used to: calls in flight on other threads reopened a channel and an enqueue stream
    (its reader thread running) after close() returned, and later calls reopened silently."""

    def test_close_stays_closed(self, server: Any) -> None:
        client = Client(server.address)
        client.enqueue_task(Task(type="misuse.t"))
        stop = threading.Event()
        outcomes = collections.Counter[str]()
        streams: list[Any] = []

        def run() -> None:
            while not stop.is_set():
                try:
                    client.enqueue_tasks([Task(type="misuse.t") for _ in range(50)])
                    client.get_task_status(client.enqueue_task(Task(type="misuse.t")))
                    outcomes["ok"] += 1
                except ConfigError as exc:
                    outcomes[type(exc).__name__] += 1
                    return
                except Exception as exc:
                    outcomes[f"{type(exc).__name__}: {exc}"] += 1
                    return

        threads = [threading.Thread(target=run) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: outcomes["ok"] >= 16, what="calls in flight")
            streams.extend(client._enqueue_streams.values())
            client.close()
        finally:
            for thread in threads:
                thread.join(timeout=30)
            stop.set()
        assert set(outcomes) <= {"ok", "ConfigError"}, outcomes
        assert outcomes["ConfigError"] == len(threads)
        assert client._channels == {}
        assert client._enqueue_streams == {}
        wait_for(lambda: not any(s._reader.is_alive() for s in streams), what="readers ending")
        with pytest.raises(ConfigError, match="this Client is closed"):
            client.enqueue_task(Task(type="misuse.after"))
        with pytest.raises(ConfigError, match="this Client is closed"):
            client.get_status()
        assert client._channels == {}
        assert client._enqueue_streams == {}


class TestClosedAsyncClient:
    """Used to: a call waiting between attempts (a backoff) when close() ran woke up and
    opened a channel, and for an enqueue a stream with its reader task, after close()
    returned; nothing closed them, and with a server answering by then the call even
    succeeded through them. Now it ends with ServerUnavailable and opens nothing; a call
    made after close() still opens connections (how a client moves to another loop)."""

    @pytest.mark.parametrize("kind", ["call", "enqueue"])
    async def test_a_call_waiting_to_retry_does_not_reopen_a_closed_client(
        self, start_server: Any, kind: str
    ) -> None:
        address = f"127.0.0.1:{free_port()}"  # nothing listens there yet
        client = AsyncClient(
            address,
            retry=RetryPolicy(total_timeout=60, backoff_base=3, backoff_cap=3),
            breaker=BreakerPolicy(failure_threshold=1000),
        )
        if kind == "call":
            in_flight = asyncio.create_task(client.get_task_status(str(uuid.uuid4())))
        else:
            in_flight = asyncio.create_task(client.enqueue_task(Task(type="misuse.t")))
        # Its first attempt failed: the call now waits out its backoff.
        await async_wait_for(lambda: client._ring.last_failure, what="a failed first attempt")
        # A server answers there before the backoff ends.
        await asyncio.to_thread(start_server, grpc_listen=address)
        await client.close()
        # The call ends on its own ("... during the call"); a waiting enqueue is failed
        # by close() itself.
        with pytest.raises(ServerUnavailable, match="the client was closed"):
            await in_flight
        assert client._channels == {}
        assert client._enqueue_streams == {}
        # A call made after close() opens new connections, as documented.
        task_id = await client.enqueue_task(Task(type="misuse.t"))
        assert (await client.get_task_status(task_id)).state is TaskState.QUEUED
        await client.close()
        assert client._channels == {}

    async def test_a_call_made_while_close_runs_neither_breaks_it_nor_is_left_behind(
        self, start_server: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Used to: close() iterated over the client's channels while awaiting each one's
        close, and a call made meanwhile that opened a connection to another server made it
        raise "dictionary changed size during iteration", leaving the rest open."""
        first, second = start_server(), start_server()
        client = AsyncClient([first.address, second.address])
        task_id = await client.enqueue_task(Task(type="misuse.t"))
        used = client._ring.current
        closing_begun, go_on = asyncio.Event(), asyncio.Event()
        channel = client._channels[used]
        real_close = channel.close

        async def held_close(grace: float | None = None) -> None:
            closing_begun.set()
            await go_on.wait()
            await real_close(grace)

        monkeypatch.setattr(channel, "close", held_close)
        closing = asyncio.create_task(client.close())
        await asyncio.wait_for(closing_begun.wait(), timeout=10)
        client._ring.advance()  # the call goes to the other server: a new connection
        status = await client.get_task_status(task_id)
        go_on.set()
        await asyncio.wait_for(closing, timeout=10)

        assert status.state is TaskState.QUEUED
        # The call's own connection stays open until the next close(), on this loop.
        assert list(client._channels) == [client._ring.current]
        assert client._ring.current != used
        await client.close()
        assert client._channels == {}
        assert client._loop is None

    async def test_a_channel_opened_after_close_ties_the_client_to_its_loop_again(
        self, server: Any
    ) -> None:
        """A call that began while close() ran goes on (it is not the closed one), and its
        next attempt may open a channel after close() has let go of the loop. That channel
        is this loop's: a call from another loop used to take it for its own (found by a
        review); now it is told the client belongs to another loop."""
        client = AsyncClient(server.address)
        task_id = await client.enqueue_task(Task(type="misuse.t"))
        await client.close()
        assert client._loop is None
        client._channel(server.address)  # the late call's next attempt
        assert client._loop is asyncio.get_running_loop()

        def from_another_loop() -> str:
            return outcome(lambda: asyncio.run(client.get_task_status(task_id)))

        assert "another event loop" in await asyncio.to_thread(from_another_loop)
        await client.close()
        assert client._channels == {}


def outcome(step: Callable[[], object]) -> str:
    """How long `step` took and what it raised: "0.01 ConfigError: ...", or "no error"."""
    started = time.monotonic()
    try:
        step()
        said = "no error"
    except BaseException as exc:
        said = f"{type(exc).__name__}: {exc}"
    return f"{time.monotonic() - started:.2f} {said}"


def in_a_forked_child(*steps: Callable[[], object]) -> list[tuple[float, str]]:
    """Fork; the child runs `steps` in turn and reports each `outcome`, then leaves without
    cleanup. Each step's (seconds, what it raised), as the child reported them."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read_end)
            os.write(write_end, "\n".join(outcome(step) for step in steps).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, what="the child exiting")
        with os.fdopen(read_end, "rb") as pipe:
            lines = pipe.read().decode().splitlines()
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    return [(float(elapsed), said) for elapsed, said in (line.split(" ", 1) for line in lines)]


class TestForkedChild:
    """Used to: the child waited out the whole retry budget (30 s by default), then raised
    ServerUnavailable "the server did not accept the enqueue stream"."""

    def test_child_is_told_at_once(self, server: Any) -> None:
        client = Client(server.address)
        client.get_task_status(client.enqueue_task(Task(type="misuse.parent")))
        ((elapsed, said),) = in_a_forked_child(
            lambda: client.enqueue_task(Task(type="misuse.child"))
        )
        assert said.startswith("ConfigError: a Client cannot be used across fork()"), said
        assert elapsed < 1
        # The parent's client is untouched.
        assert client.get_task_status(client.enqueue_task(Task(type="misuse.parent")))
        client.close()

    def test_async_client_made_at_import_is_refused_in_a_child_of_a_connected_parent(
        self, server: Any
    ) -> None:
        """A prefork web server's worker with the AsyncClient its parent made at import,
        used on the worker's own event loop, when the parent (this test process) held
        other connections at the fork. Used to: the child opened connections of its own in
        grpc's copied state (its fork support is off), and the call hung: still there
        after 20 s, with a retry budget of 5 s. A child of a parent that never connected
        adopts the client (test_prefork_clients.py)."""
        client = AsyncClient(server.address, retry=RetryPolicy(total_timeout=5))

        def enqueue() -> str:
            return asyncio.run(client.enqueue_task(Task(type="misuse.child")))

        with Client(server.address) as connected:  # the parent's other connections
            connected.get_task_status(connected.enqueue_task(Task(type="misuse.parent")))
            said = in_a_forked_child(
                enqueue,
                lambda: asyncio.run(client.get_task_status(str(uuid.uuid4()))),
                lambda: asyncio.run(client.close()),
                enqueue,
            )
        assert [text.split(":", 2)[:2] for _, text in said] == [
            ["ConfigError", " an AsyncClient cannot be used across fork()"],
            ["ConfigError", " an AsyncClient cannot be used across fork()"],
            ["no error"],  # close() marks the child's copy closed, and touches nothing else
            ["ConfigError", " an AsyncClient cannot be used across fork()"],
        ], said
        assert all(elapsed < 1 for elapsed, _ in said), said
        assert f"created in process {os.getpid()}, which held gRPC connections" in said[0][1]

        # The parent's client is untouched.
        async def use() -> None:
            async with client:
                task_id = await client.enqueue_task(Task(type="misuse.parent"))
                assert (await client.get_task_status(task_id)).state is TaskState.QUEUED

        asyncio.run(use())

    async def test_async_client_in_use_on_the_parents_loop_is_refused_in_the_child(
        self, server: Any
    ) -> None:
        """Used to: ConfigError blaming "another event loop, which is still open" (the
        parent's, as the child's copy of it looked), and close() in the child raised it
        too."""
        client = AsyncClient(server.address)
        task_id = await client.enqueue_task(Task(type="misuse.parent"))
        said = in_a_forked_child(
            lambda: asyncio.run(client.get_task_status(task_id)),
            lambda: asyncio.run(client.close()),
        )
        assert [text.split(":", 2)[:2] for _, text in said] == [
            ["ConfigError", " an AsyncClient cannot be used across fork()"],
            ["no error"],
        ], said
        # The parent's client goes on, on its loop, with the connections it had.
        channels = dict(client._channels)
        assert (await client.get_task_status(task_id)).state is TaskState.QUEUED
        assert client._channels == channels
        await client.close()


class TestBadArguments:
    """Used to: raw TypeError / ValueError from deep inside the client or protobuf."""

    def test_sync(self, server: Any) -> None:
        with Client(server.address) as client:
            ids = client.enqueue_tasks(Task(type="misuse.gen") for _ in range(3))
            assert len(ids) == 3
            with pytest.raises(InvalidTask, match="got NoneType"):
                client.enqueue_tasks(None)  # type: ignore[arg-type]
            with pytest.raises(InvalidTask, match="enqueue_task takes a single Task"):
                client.enqueue_tasks(Task(type="misuse.one"))  # type: ignore[arg-type]
            with pytest.raises(InvalidTask, match="limit must be an int, got str"):
                client.list_tasks(limit="5")  # type: ignore[arg-type]
            with pytest.raises(InvalidTask, match="limit must be from 1 to"):
                client.list_tasks(limit=10**12)
            with pytest.raises(InvalidTask, match="limit must be from 1 to"):
                client.list_workers(limit=10**12)
            with pytest.raises(InvalidTask, match="limit must be from 0 to"):
                client.retry_tasks(states="failed", limit=10**20)
            with pytest.raises(InvalidTask, match="states must be a task state"):
                client.list_tasks(states=3)  # type: ignore[arg-type]
            assert client.list_tasks(states=[TaskState.QUEUED], limit=10).tasks

    async def test_async(self, server: Any) -> None:
        async with AsyncClient(server.address) as client:
            ids = await client.enqueue_tasks(Task(type="misuse.gen") for _ in range(3))
            assert len(ids) == 3
            with pytest.raises(InvalidTask, match="got NoneType"):
                await client.enqueue_tasks(None)  # type: ignore[arg-type]
            with pytest.raises(InvalidTask, match="limit must be an int, got bool"):
                await client.list_tasks(limit=True)
            with pytest.raises(InvalidTask, match="limit must be from 1 to"):
                await client.list_workers(limit=10**12)
            with pytest.raises(InvalidTask, match="states must be a task state"):
                await client.list_tasks(states=3)  # type: ignore[arg-type]
