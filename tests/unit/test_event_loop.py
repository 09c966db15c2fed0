"""The server's and the workers' event loop: uvloop unless CONVEYOR_EVENT_LOOP=asyncio."""

from __future__ import annotations

import asyncio
import sys

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
