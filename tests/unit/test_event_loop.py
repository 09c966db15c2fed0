"""The server's and the workers' event loop: uvloop unless CONVEYOR_EVENT_LOOP=asyncio."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import pytest

from conveyor import event_loop


async def loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not support Windows")
def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_EVENT_LOOP", raising=False)
    assert event_loop.run(loop_type()).startswith("uvloop")


@pytest.mark.parametrize("value", ["asyncio", " AsyncIO "])
def test_asyncio_when_asked(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CONVEYOR_EVENT_LOOP", value)
    assert event_loop.loop_factory() is None
    assert event_loop.run(loop_type()).startswith("asyncio")


def test_the_result_and_errors_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_EVENT_LOOP", raising=False)

    async def fails() -> None:
        raise KeyError("inside the loop")

    assert event_loop.run(asyncio.sleep(0, result=42)) == 42
    with pytest.raises(KeyError, match="inside the loop"):
        event_loop.run(fails())


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_an_abandoned_task_that_ends_is_released(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, loop: str
) -> None:
    """A task that ignores its cancellation is left behind when `close_within` passes, and
    referenced while pending; once it ends (here while the loop closes an async generator)
    it is dropped. Every abandoned task used to be kept for the life of the process."""
    if loop == "uvloop" and sys.platform == "win32":
        pytest.skip("uvloop does not support Windows")
    monkeypatch.setenv("CONVEYOR_EVENT_LOOP", loop)
    held: dict[str, object] = {}

    async def main() -> None:
        release, finished = asyncio.Event(), asyncio.Event()

        async def stubborn() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await release.wait()  # ignores its cancellation until released
                finished.set()

        async def generator() -> AsyncIterator[int]:
            try:
                yield 1
            finally:
                # Closed by the loop after the task was left behind: let it end meanwhile.
                release.set()
                await finished.wait()

        held["task"] = asyncio.get_running_loop().create_task(stubborn(), name="stubborn")
        held["generator"] = suspended = generator()
        await anext(suspended)
        await asyncio.sleep(0)  # the task starts waiting

    event_loop.run(main(), close_within=0.05)

    task = held["task"]
    assert isinstance(task, asyncio.Task)
    assert "stubborn" in caplog.text  # it was left behind
    assert task.done()
    assert task not in event_loop._ABANDONED
