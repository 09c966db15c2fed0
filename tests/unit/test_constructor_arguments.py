"""Worker, Client and AsyncClient refuse arguments that cannot work, when they are made.

Each of these was accepted and failed later, or never:
- worker_id 0, False or "" (an unset environment variable read with a default of "") was
  replaced by a random id, so the worker registered under a name its operator never chose;
- a codec that is the class rather than an instance, or any object without seal() and
  open(): every payload then failed when it was sealed or opened, each task spending its
  attempts on a mistake in the set-up;
- a token that is not a string: an AttributeError from deep inside;
- a concurrency of 2**32: protobuf's ValueError at start().

Found by a review of the worker's life cycle.
"""

from __future__ import annotations

from typing import Any

import pytest

from conveyor import AsyncClient, Client, Worker
from conveyor.codec import AesGcmCodec
from conveyor.errors import ConfigError
from conveyor.worker.runtime import MAX_CONCURRENCY

ADDRESS = "127.0.0.1:1"  # never connected to: nothing here connects


@pytest.mark.parametrize("worker_id", [0, False, ""], ids=["zero", "false", "empty"])
def test_a_falsy_worker_id_is_refused(worker_id: object) -> None:
    with pytest.raises(ConfigError):
        Worker(ADDRESS, worker_id=worker_id)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [Worker, Client, AsyncClient], ids=["worker", "client", "async"])
@pytest.mark.parametrize(
    ("codec", "expected"),
    [
        (AesGcmCodec, "the class itself, not an instance"),
        ("aes", "got str"),
        (object(), "got object"),
    ],
    ids=["class", "string", "object"],
)
def test_a_codec_without_seal_and_open_is_refused(make: Any, codec: object, expected: str) -> None:
    with pytest.raises(ConfigError, match="codec must be an object with seal"):
        make(ADDRESS, codec=codec)
    with pytest.raises(ConfigError, match=expected):
        make(ADDRESS, codec=codec)


def test_a_codec_instance_is_taken() -> None:
    codec = AesGcmCodec([("k1", b"\x01" * 32)])
    assert Worker(ADDRESS, codec=codec).codec is codec


@pytest.mark.parametrize("make", [Worker, Client, AsyncClient], ids=["worker", "client", "async"])
def test_a_token_that_is_not_a_string_is_refused(make: Any) -> None:
    with pytest.raises(ConfigError, match="the token must be a string, not int"):
        make(ADDRESS, token=123)


@pytest.mark.parametrize("concurrency", [0, MAX_CONCURRENCY + 1, 2**32])
def test_concurrency_out_of_range_is_refused(concurrency: int) -> None:
    with pytest.raises(ConfigError, match=f"from 1 to {MAX_CONCURRENCY}"):
        Worker(ADDRESS, concurrency=concurrency)


def test_the_largest_concurrency_is_taken() -> None:
    assert Worker(ADDRESS, concurrency=MAX_CONCURRENCY).concurrency == MAX_CONCURRENCY


def test_a_handler_class_is_refused_and_its_instance_taken() -> None:
    """A class with an async __call__ was taken for an async handler; calling it only built
    an instance, and every attempt failed awaiting it (found by the same review)."""

    class Sender:
        async def __call__(self, _ctx: object, payload: bytes) -> bytes:
            return payload

    worker = Worker(ADDRESS)
    with pytest.raises(ConfigError, match="is the class Sender: register an instance"):
        worker.register_handler("send", Sender)
    worker.register_handler("send", Sender())
    registered = worker.registry.get("send")
    assert registered is not None
    assert registered.is_async
