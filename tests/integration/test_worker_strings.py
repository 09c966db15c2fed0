"""A worker's id, host and version: free text it chooses, which operators see in the CLI,
the dashboard and the server's log.

The server refuses control and format characters in them (a newline forges log lines, ESC
rewrites an operator's terminal, a bidi override reorders what follows); the worker
framework's own defaults never contain one, whatever the machine's hostname.
"""

from __future__ import annotations

import socket
import uuid

import grpc
import pytest
from helpers import run_cli, running, worker_stub

from conveyor import Task, Worker
from conveyor.errors import ConfigError
from conveyor.protocol.v1 import conveyor_pb2 as pb

TYPE = "strings.job"
# Newline, carriage return, ESC, NUL, a C1 control, a bidi override, a zero-width joiner
# and the Unicode line separator.
UNPRINTABLE = ["\n", "\r", "\x1b", "\x00", "\x85", "\u202e", "\u200d", "\u2028"]


def register(stub, **fields) -> grpc.RpcError | None:
    request = {"worker_id": f"w-{uuid.uuid4().hex[:8]}", "host": "h", "version": "1"} | fields
    try:
        stub.RegisterWorker(
            pb.RegisterWorkerRequest(**request, pid=1, task_types=[TYPE], concurrency=1),
            timeout=10,
        )
    except grpc.RpcError as exc:
        return exc
    return None


class TestTheServerRefusesUnprintableCharacters:
    @pytest.mark.parametrize("field", ["worker_id", "host", "version"])
    @pytest.mark.parametrize("char", UNPRINTABLE, ids=[f"U+{ord(c):04X}" for c in UNPRINTABLE])
    def test_at_registration(self, server, db, field: str, char: str) -> None:
        """RegisterWorker answers INVALID_ARGUMENT naming the field, and records nothing.
        The id was checked for NUL and length only, host and version for nothing: a worker
        id with a newline forged lines in the server's log, one with ESC or rich markup
        broke or rewrote `conveyor workers`."""
        marker = f"m-{uuid.uuid4().hex[:8]}"
        with worker_stub(server.address) as stub:
            refused = register(stub, **{field: f"{marker}{char}x"})

        assert refused is not None, f"a {field} with U+{ord(char):04X} was accepted"
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.details().startswith(f"{field} must not contain control or format")
        assert f"U+{ord(char):04X}" in refused.details()
        stored = db.fetchval(
            "SELECT count(*) FROM conveyor_workers WHERE id LIKE $1 OR host LIKE $1 "
            "OR version LIKE $1",
            f"{marker}%",
        )
        assert stored == 0

    def test_on_every_call_that_names_a_worker(self, server) -> None:
        """A worker id no worker could register is refused by the other calls too: they
        log it (`worker ... stopped`) or store it (leases, history)."""
        bad = "w\nforged line"
        with worker_stub(server.address) as stub:
            calls = [
                (stub.LeaseTasks, pb.LeaseTasksRequest(worker_id=bad, task_types=[TYPE])),
                (stub.Heartbeat, pb.HeartbeatRequest(worker_id=bad)),
                (stub.UnregisterWorker, pb.UnregisterWorkerRequest(worker_id=bad)),
                (stub.ReportResults, pb.ReportResultsRequest(worker_id=bad)),
            ]
            for method, request in calls:
                with pytest.raises(grpc.RpcError) as refused:
                    method(request, timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                assert "worker_id must not contain" in refused.value.details()

    def test_printable_text_of_any_script_is_accepted(self, server, db) -> None:
        """Only control and format characters are refused: accents, CJK, emoji, spaces
        and rich's markup brackets are all printable (the CLI shows them as text)."""
        worker_id = f"wörker-工場-✓ [b]x[/b] {uuid.uuid4().hex[:6]}"
        with worker_stub(server.address) as stub:
            assert register(stub, worker_id=worker_id, host="hôte 1", version="1.0 β") is None
        row = db.fetch("SELECT host, version FROM conveyor_workers WHERE id = $1", worker_id)
        assert [(r["host"], r["version"]) for r in row] == [("hôte 1", "1.0 β")]


class TestTheWorkersOwnDefaults:
    def test_an_odd_hostname_neither_stops_the_worker_nor_reaches_the_server(
        self, server, client, monkeypatch
    ) -> None:
        """A hostname with control or format characters, longer than any limit, still gives
        a worker that registers: the default id and the host it sends are made printable
        and short enough. (The default id was the raw hostname, so a long one exceeded the
        200-character id limit and the worker could not start.)"""
        odd = "box\x1b[2J\u202e" + "n" * 300
        monkeypatch.setattr(socket, "gethostname", lambda: odd)
        worker = Worker(server.address, concurrency=1)
        worker.register_handler(TYPE, lambda _ctx, payload: payload)
        with running(worker):
            listed = {w.id: w for w in client.list_workers()}

        assert worker.worker_id in listed
        assert len(worker.worker_id) <= 200
        assert worker.worker_id.startswith("box?[2J?nnn")
        host = listed[worker.worker_id].host
        assert host.startswith("box?[2J?nnn")
        assert len(host) == 255

    @pytest.mark.parametrize("worker_id", ["mailer\n0", "x" * 201, "mailer\u202e0"])
    def test_an_id_the_server_would_refuse_is_a_config_error_at_once(self, worker_id) -> None:
        """Worker(worker_id=...) says what is wrong when it is built, not at registration."""
        with pytest.raises(ConfigError, match="worker_id"):
            Worker("localhost:1", worker_id=worker_id)


# Stored before the server refused such ids, or by a server older than that: rich markup
# that does not parse ([/] closes nothing), markup that does (a hyperlink, blinking), an
# OSC title change with BEL, a clear screen, a bidi override.
HOSTILE_ID = "[/]evil[link=https://evil.example]w3[/link][blink]x\x1b]0;PWNED\x07\x1b[2J\u202e"
HOSTILE_HOST = "h[/]\x1b[31mred"
SHOWN_ID = "[/]evil[link=https://evil.example]w3[/link][blink]x"


class TestTheCliShowsAWorkersTextAsText:
    def test_rows_stored_before_the_check_are_shown_escaped(self, server, client, db) -> None:
        """`conveyor workers`, `tasks list`, `tasks show` and `status --history` show a
        hostile worker id and host literally, brackets and all, with its control
        characters as escapes. They crashed with a MarkupError traceback (exit 1) on
        `[/]`, turned `[link=...]` into a hyperlink, and wrote ESC to the terminal."""
        task_id = client.enqueue_task(Task(type=TYPE, payload=b"x"))
        worker_id = f"w-{uuid.uuid4().hex[:8]}"
        with worker_stub(server.address) as stub:
            assert register(stub, worker_id=worker_id) is None
            leased = stub.LeaseTasks(
                pb.LeaseTasksRequest(worker_id=worker_id, task_types=[TYPE], max_tasks=1),
                timeout=10,
            )
        assert [lease.task_id for lease in leased.leases] == [task_id]
        db.execute(
            "UPDATE conveyor_workers SET id = $2, host = $3, version = $3 WHERE id = $1",
            worker_id,
            HOSTILE_ID,
            HOSTILE_HOST,
        )
        db.execute("UPDATE conveyor_tasks SET worker_id = $1 WHERE id = $2", HOSTILE_ID, task_id)
        db.execute(
            "UPDATE conveyor_task_events SET worker_id = $1 WHERE task_id = $2", HOSTILE_ID, task_id
        )

        commands = [
            ("workers",),
            ("tasks", "list"),
            ("tasks", "show", task_id),
            ("status", task_id, "--history"),
        ]
        for command in commands:
            result = run_cli(*command, "--server", server.address, COLUMNS="400")
            shown = f"conveyor {' '.join(command)}: exit {result.returncode}\n{result.stderr}"
            assert result.returncode == 0, shown
            assert "Traceback" not in result.stderr, shown
            assert "\x1b" not in result.stdout, shown
            assert "\x07" not in result.stdout, shown
            assert "\u202e" not in result.stdout, shown
            # Literally, with its escapes: nothing was read as markup.
            assert f"{SHOWN_ID}\\x1b]0;PWNED\\x07\\x1b[2J\\u202e" in result.stdout, (
                shown + result.stdout
            )
        workers = run_cli("workers", "--server", server.address, COLUMNS="400")
        assert "h[/]\\x1b[31mred:1" in workers.stdout, workers.stdout
