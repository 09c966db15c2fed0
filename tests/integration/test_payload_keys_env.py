"""CONVEYOR_PAYLOAD_KEYS with a URL-safe key as tools print it.

docs/security.md: "a key may be written in either base64 alphabet (standard or URL-safe)".
URL-safe base64 is usually written without its padding: `secrets.token_urlsafe(32)`, JWK's
"k", `openssl rand 32 | basenc --base64url | tr -d =`. Such a key (43 characters for 32
bytes, no "=") was refused as "not valid base64", although it is exactly 32 bytes.
"""

from __future__ import annotations

import base64

import pytest
from helpers import wait_final

from conveyor import AesGcmCodec, Client, Task, TaskState, Worker

KEY = bytes(range(32))
UNPADDED = base64.urlsafe_b64encode(KEY).decode().rstrip("=")


def test_an_unpadded_url_safe_key_is_accepted(server, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(UNPADDED) == 43
    monkeypatch.setenv("CONVEYOR_PAYLOAD_KEYS", f"k1={UNPADDED}")
    worker = Worker(server.address)  # reads the keys: refused here today (ConfigError)
    worker.register_handler("echo", lambda _ctx, payload: payload)
    worker.start()
    try:
        with Client(server.address, codec=AesGcmCodec([("k1", KEY)])) as client:
            task_id = client.enqueue_task(Task(type="echo", payload=b"secret"))
            status = wait_final(client, task_id)
    finally:
        worker.stop()
    assert status.state is TaskState.SUCCEEDED
    assert status.result == b"secret"
