"""A Python team's own code, written against Conveyor's public API, under `mypy --strict`.

The package ships `py.typed`, so its annotations are the contract users type-check against.
Each test writes a small user program into tmp_path and runs mypy on it, as a user's CI
would: the program must check without a cast, an `Any` or a `type: ignore`.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def mypy_errors(tmp_path: Path, source: str) -> str:
    """mypy --strict's complaints about `source` as a user's module ('' when none)."""
    program = tmp_path / "user_program.py"
    program.write_text(textwrap.dedent(source))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            str(program),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode == 0:
        return ""
    return result.stdout + result.stderr


def test_a_user_program_using_the_whole_public_api_type_checks(tmp_path: Path) -> None:
    """Both clients, a Worker with sync and async handlers, every TaskContext member, the
    exceptions users catch and every TaskStatus/TaskEvent field, read with the types the
    docs give them."""
    errors = mypy_errors(
        tmp_path,
        """
        from __future__ import annotations

        import asyncio
        from datetime import datetime, timedelta

        from conveyor import (
            AsyncClient, BulkResult, Client, ClusterStatus, ConveyorError, Task,
            TaskContext, TaskEvent, TaskPage, TaskState, TaskStatus, Worker, WorkerInfo,
            WorkerPage, errors,
        )
        from conveyor.errors import (
            CircuitOpen, ConfigError, InvalidTask, PermanentFailure, ServerUnavailable,
            TaskAlreadyFinished, TaskNotFound, WorkerCrashed,
        )

        worker = Worker("localhost:50051", concurrency=4, drain_timeout=5)

        @worker.handler("sync.one")
        def sync_one(ctx: TaskContext, payload: bytes) -> bytes | None:
            left: timedelta = ctx.time_left()
            deadline: datetime = ctx.deadline
            ids: tuple[str, str, str] = (ctx.task_id, ctx.task_type, ctx.lease_id)
            numbers: tuple[int, int] = (ctx.attempt, ctx.max_retries)
            if ctx.cancelled.wait(0.1):
                return None
            ctx.logger.info("%s %s %s %s", left, deadline, ids, numbers)
            ctx.heartbeat("half way")
            if not payload:
                raise PermanentFailure("empty")
            return payload

        async def async_one(ctx: TaskContext, payload: bytes) -> bytes:
            await asyncio.sleep(0)
            return payload

        worker.register_handler("async.one", async_one)

        def read(status: TaskStatus) -> None:
            state: TaskState = status.state
            final: bool = state.is_final
            result: bytes | None = status.result
            error: str | None = status.last_error
            started: datetime | None = status.started_at
            timeout: timedelta = status.timeout
            events: tuple[TaskEvent, ...] = status.history
            print(state, final, result, error, started, timeout, events, status.attempts)

        def produce() -> None:
            with Client("localhost:50051") as client:
                task_id: str = client.enqueue_task(Task(type="sync.one", timeout=30))
                try:
                    read(client.cancel_task(task_id))
                except TaskAlreadyFinished as exc:
                    print(exc.task_id, exc.state)
                except TaskNotFound as exc:
                    print(exc.task_id)
                except InvalidTask as exc:
                    print(exc.field, exc.message)
                except CircuitOpen as exc:
                    print(exc.retry_in)
                except ServerUnavailable:
                    pass
                except ConveyorError as exc:
                    print(exc.committed_ids)
                page: TaskPage = client.list_tasks(states=[TaskState.FAILED, "queued"])
                workers: list[WorkerInfo] = client.list_workers()
                worker_page: WorkerPage = client.list_workers_page(limit=10)
                status: ClusterStatus = client.get_status()
                bulk: BulkResult = client.retry_tasks(states="failed", dry_run=True)
                print(page, workers, worker_page, status, bulk)

        async def produce_async() -> None:
            async with AsyncClient(["localhost:50051"]) as client:
                ids: list[str] = await client.enqueue_tasks(Task(type="a") for _ in range(3))
                read(await client.get_task_status(ids[0], history=True))
                reasons: list[str] = await client.explain_task(ids[0])
                print(reasons)

        def serve() -> None:
            try:
                worker.run()
            except WorkerCrashed as exc:
                print(exc.message)
            except (ConfigError, errors.ServerUnavailable):
                pass
        """,
    )
    assert errors == ""


def test_a_decorated_handler_keeps_its_own_type(tmp_path: Path) -> None:
    """`@worker.handler(...)` returns the function it was given, so a team unit-tests its
    handlers by calling them. mypy must see the function as written: typed
    `Callable[[Handler], Handler]`, the decorator turned every decorated function into the
    union of a sync and an async handler, so `await my_async_handler(...)` and
    `result: bytes = my_sync_handler(...)` were both type errors that needed a cast."""
    errors = mypy_errors(
        tmp_path,
        """
        from conveyor import TaskContext, Worker

        worker = Worker("localhost:50051")

        @worker.handler("render")
        def render(ctx: TaskContext, payload: bytes) -> bytes:
            return payload.upper()

        @worker.handler("fetch")
        async def fetch(ctx: TaskContext, payload: bytes) -> bytes:
            return payload

        def test_render(ctx: TaskContext) -> None:
            result: bytes = render(ctx, b"a")
            assert result == b"A"

        async def test_fetch(ctx: TaskContext) -> None:
            result: bytes = await fetch(ctx, b"a")
            assert result == b"a"
        """,
    )
    assert errors == ""


def test_handlers_returning_bytearray_or_memoryview_type_check(tmp_path: Path) -> None:
    """getting-started.md: "Succeed by returning `bytes` (or `bytearray`, `memoryview`) or
    `None`", and the worker stores them (runtime._result_bytes). The handler type accepted
    only `bytes | None`: under mypy 2 (strict bytes), a handler annotated to return what
    the docs allow could not be registered without a cast or an ignore."""
    errors = mypy_errors(
        tmp_path,
        """
        from conveyor import TaskContext, Worker

        worker = Worker("localhost:50051")

        @worker.handler("buffer")
        def buffer(ctx: TaskContext, payload: bytes) -> bytearray:
            out = bytearray(payload)
            out.extend(b"!")
            return out

        def view(ctx: TaskContext, payload: bytes) -> memoryview:
            return memoryview(payload)[1:]

        async def async_view(ctx: TaskContext, payload: bytes) -> memoryview:
            return memoryview(payload)

        worker.register_handler("view", view)
        worker.register_handler("async.view", async_view)
        """,
    )
    assert errors == ""
