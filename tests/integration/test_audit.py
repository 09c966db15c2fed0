"""Who acted: operator and producer actions name their principal in the history and the log.

With tokens, an action records "name (token id)"; without, "anonymous". Pausing and
resuming (actions on no single task) go to conveyor_audit_log, and a paused type says who
paused it. The system's own events (started, succeeded) name nobody.
"""

from __future__ import annotations

import urllib.request
from typing import TYPE_CHECKING

import pytest

from conveyor import Client, Task, TaskState
from conveyor.auth import Role, new_token

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from conftest import ServerThread
    from helpers import Db


def audit_rows(db: Db) -> list[tuple[str, str, str, str | None]]:
    return [
        (row["actor"], row["action"], row["target"], row["detail"])
        for row in db.fetch("SELECT * FROM conveyor_audit_log ORDER BY id")
    ]


class TestWithTokens:
    @pytest.fixture
    def secured(
        self, start_server: Callable[..., ServerThread], tmp_path: Path
    ) -> tuple[ServerThread, dict[str, tuple[str, str]]]:
        """A server with an admin and a producer token: {role: (token, actor)}."""
        tokens: dict[str, tuple[str, str]] = {}
        entries = []
        for name, role in (("ops", Role.ADMIN), ("billing", Role.PRODUCER)):
            token, entry = new_token(name, role)
            tokens[role.value] = (token, f"{name} (token {entry.token_id})")
            entries.append(entry.as_toml())
        path = tmp_path / "tokens.toml"
        path.write_text("\n".join(entries))
        return start_server(tokens_file=path), tokens

    def test_cancel_retry_pause_and_resume_record_their_actor(
        self, secured: tuple[ServerThread, dict[str, tuple[str, str]]], db: Db
    ) -> None:
        server, tokens = secured
        admin_token, admin = tokens["admin"]
        producer_token, producer = tokens["producer"]
        with Client(server.address, token=producer_token) as app:
            first = app.enqueue_task(Task(type="audited", payload=b""))
            second = app.enqueue_task(Task(type="audited", payload=b""))
            app.cancel_task(first)
        with Client(server.address, token=admin_token) as ops:
            ops.cancel_tasks([second], reason="duplicate order")
            ops.retry_tasks([first])
            assert ops.pause_type("audited", reason="supplier down")
            paused = ops.get_status().paused_types
            assert [(p.type, p.paused_by) for p in paused] == [("audited", admin)]
            assert ops.resume_type("audited")
            assert not ops.resume_type("audited")  # a no-op is not an action
            first_history = ops.get_task_status(first, history=True).history
            second_history = ops.get_task_status(second, history=True).history
        assert [(e.event, e.actor) for e in first_history] == [
            ("enqueued", None),
            ("cancelled", producer),
            ("retried", admin),
        ]
        assert [(e.event, e.actor, e.detail) for e in second_history][-1] == (
            "cancelled",
            admin,
            "duplicate order",
        )
        assert audit_rows(db) == [
            (admin, "pause", "audited", "supplier down"),
            (admin, "resume", "audited", None),
        ]


class TestWithoutTokens:
    def test_actions_are_anonymous_and_the_system_names_nobody(
        self, server: ServerThread, db: Db
    ) -> None:
        with Client(server.address) as client:
            task_id = client.enqueue_task(Task(type="anon", payload=b""))
            # The dashboard's cancel button, as a browser on loopback presses it.
            request = urllib.request.Request(  # noqa: S310 - the test server's own URL
                f"{server.http_url}/ui/tasks/{task_id}/cancel", data=b"", method="POST"
            )
            opener = urllib.request.build_opener(_NoRedirect)
            with pytest.raises(urllib.error.HTTPError) as redirected:
                opener.open(request, timeout=10)
            assert redirected.value.code == 303
            redirected.value.close()
            status = client.get_task_status(task_id, history=True)
            client.pause_type("anon")
        assert status.state is TaskState.CANCELLED
        assert [(e.event, e.actor, e.detail) for e in status.history] == [
            ("enqueued", None, None),
            ("cancelled", "anonymous", "cancelled from the dashboard"),
        ]
        assert audit_rows(db) == [("anonymous", "pause", "anon", None)]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: object, **_kwargs: object) -> None:
        return None
