"""The `conveyor` command line as a user runs it: real processes, real output, exit codes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime

import pytest
from helpers import (
    BACK_TO_SCHEMA_11,
    Db,
    assert_ok,
    assert_one_error_line,
    conveyor_command,
    free_port,
    holding,
    process_env,
    run_sql,
    wait_final,
    wait_for,
    with_user,
)
from helpers import run_cli as run

from conveyor import Task, TaskState
from conveyor.storage import migrate

COMMANDS = ("server", "migrate", "worker", "enqueue", "status", "cancel", "dev", "token")


@pytest.mark.slow
class TestHelp:
    def test_help_lists_every_command(self):
        out = assert_ok(run("--help"))
        listed = {
            line.split()[0] for line in out.split("Commands:", 1)[1].splitlines() if line.strip()
        }
        assert listed >= set(COMMANDS), out


@pytest.mark.slow
class TestTaskCommands:
    def test_enqueue_status_and_cancel(self, server, client, db):
        """enqueue prints the new id; status shows it queued (with history); cancel cancels."""
        out = assert_ok(run("enqueue", "demo-type", "--payload", "hi", "--server", server.address))
        lines = out.splitlines()
        assert len(lines) == 1
        task_id = lines[0]
        assert str(uuid.UUID(task_id)) == task_id
        row = db.task(task_id)
        assert (row["type"], bytes(row["payload"]), row["state"]) == ("demo-type", b"hi", "queued")

        document = json.loads(
            assert_ok(run("status", task_id, "--json", "--server", server.address))
        )
        assert document["id"] == task_id
        assert document["type"] == "demo-type"
        assert document["state"] == "queued"
        assert document["attempts"] == 0
        assert "history" not in document

        document = json.loads(
            assert_ok(run("status", task_id, "--json", "--history", "--server", server.address))
        )
        assert document["state"] == "queued"
        assert [event["event"] for event in document["history"]] == ["enqueued"]
        assert document["history"][0]["state"] == "queued"

        # For people, time reads as in every other view: UTC, milliseconds (conveyor.text).
        shown = assert_ok(run("status", task_id, "--history", "--server", server.address))
        created = datetime.fromisoformat(document["created_at"]).astimezone(UTC)
        in_tables = created.isoformat(sep=" ", timespec="milliseconds")[:-6] + " UTC"
        assert shown.count(in_tables) == 3, shown  # created, available, the enqueued event
        assert "+00:00" not in shown
        # Whole in a narrow terminal too: the history's time was cut to `2026-12-…` /
        # `12:13:37…` / `UTC` at 80 columns and lost its minutes at 60.
        narrow = assert_ok(
            run("status", task_id, "--history", "--server", server.address, COLUMNS="60")
        )
        assert narrow.count(in_tables) == 3, narrow

        out = assert_ok(run("cancel", task_id, "--server", server.address))
        assert out.split() == [task_id, "cancelled"]
        assert client.get_task_status(task_id).state is TaskState.CANCELLED
        assert db.task(task_id)["state"] == "cancelled"

    def test_server_address_from_the_environment(self, server, client):
        out = assert_ok(run("enqueue", "env-type", CONVEYOR_SERVER=server.address))
        assert client.get_task_status(out.strip()).type == "env-type"

    @pytest.mark.parametrize(
        ("args", "expected"),
        [
            (("enqueue", "bad type!"), "may only contain"),
            (("status", "not-a-uuid"), "malformed task id"),
            (("cancel", "not-a-uuid"), "malformed task id"),
            (("enqueue", "x", "--payload-file", "/nonexistent"), "cannot read /nonexistent"),
            # In --timeout's range (a usage error outside it: tests/unit/test_cli_bounds.py),
            # but no time at all once a timedelta: Task refuses it.
            (
                ("enqueue", "x", "--timeout", "1e-9"),
                "error: timeout must be at least a microsecond, got 1e-09 s",
            ),
        ],
        ids=[
            *("bad-type", "status-bad-id", "cancel-bad-id", "missing-file"),
            "timeout-under-a-microsecond",
        ],
    )
    def test_bad_input_is_one_error_line(self, server, db, args, expected):
        line = assert_one_error_line(run(*args, "--server", server.address))
        assert expected in line
        assert db.fetchval("SELECT count(*) FROM conveyor_tasks") == 0

    def test_payload_bytes_that_are_not_utf8_are_enqueued_as_given(self, server, db):
        r"""`--payload $'\xff\xfe'`: Python hands the command each byte that does not decode
        as a lone surrogate, which used to end in a UnicodeEncodeError traceback; the
        payload is the bytes given, text and not text alike."""
        payload = b"caf\xc3\xa9 \xff\xfe\x80"
        argv = conveyor_command("enqueue", "demo.echo", "--server", server.address)
        result = subprocess.run(
            [*argv, b"--payload", payload],
            env=process_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        task_id = assert_ok(result).strip()
        assert bytes(db.task(task_id)["payload"]) == payload

    def test_a_surrogate_no_byte_decodes_to_is_one_error_line(self):
        """Only a program that calls the CLI with arguments of its own can pass one (argv
        always decodes back to bytes): InvalidTask's one line, not a UnicodeEncodeError."""
        program = (
            "from conveyor.cli.main import cli; "
            "cli(['enqueue', 'x', '--payload', 'a\\ud800b', '--server', '127.0.0.1:1'], "
            "prog_name='conveyor')"
        )
        result = subprocess.run(
            [sys.executable, "-c", program],
            env=process_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert assert_one_error_line(result) == (
            "error: --payload holds '\\ud800', which is no character and no byte of the "
            "command line; give binary payloads with --payload-file"
        )

    def test_a_server_older_than_the_cli_is_named_as_the_likely_cause(
        self, server_without_the_methods
    ):
        """Not `error: UNIMPLEMENTED: Method not found!`: which call the server lacks, and
        that it is probably older than this CLI (see test_task_api.py for the clients)."""
        address = server_without_the_methods
        for args, method in (
            (("status", str(uuid.uuid4())), "GetTask"),
            (("enqueue", "t"), "EnqueueTasks"),
            (("workers",), "ListWorkers"),
        ):
            line = assert_one_error_line(run(*args, "--server", address))
            assert line.startswith(
                f"error: UNIMPLEMENTED: the server has no {method} call: it is probably older "
                "than this client (conveyor "
            ), line

    def test_status_of_unknown_task(self, server):
        task_id = str(uuid.uuid4())
        line = assert_one_error_line(run("status", task_id, "--server", server.address))
        assert task_id in line
        assert "not found" in line

    def test_cancel_of_a_finished_task(self, server, client, spawn_worker):
        spawn_worker(server.address, concurrency=1)
        task_id = client.enqueue_task(Task(type="noop", payload=b"done"))
        assert wait_final(client, task_id).state is TaskState.SUCCEEDED

        line = assert_one_error_line(run("cancel", task_id, "--server", server.address))
        assert task_id in line
        assert "already finished" in line
        assert client.get_task_status(task_id).state is TaskState.SUCCEEDED

    def test_unreachable_server(self):
        """The client retries for the --retry-for budget, then gives up with one line.

        The library's default budget (30 s) is RetryLoop's, tested in tests/unit; here the
        CLI's own setting, from the option and from the environment.
        """
        began = time.monotonic()
        line = assert_one_error_line(
            run("--retry-for", "2", "enqueue", "x", "--server", "127.0.0.1:1", timeout=45)
        )
        from_option = time.monotonic() - began
        assert "127.0.0.1:1" in line
        # Why, too: it used to end at "failed repeatedly; next probe in 4.7s".
        assert "Connection refused" in line
        began = time.monotonic()
        line = assert_one_error_line(
            run("status", str(uuid.uuid4()), "--server", "127.0.0.1:1", CONVEYOR_RETRY_FOR="1")
        )
        from_environment = time.monotonic() - began
        assert "127.0.0.1:1" in line
        assert "Connection refused" in line
        # Within its budget, not the default 30 s (27 s here before the setting existed). It
        # may end sooner: once the breaker's next probe falls past the budget, it gives up.
        assert from_option < 12, from_option
        assert from_environment < 12, from_environment

    @pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e300"])
    def test_retry_for_must_be_a_positive_finite_number(self, value):
        """A usage error (exit 2) naming the option, never a traceback from deep inside."""
        result = run("--retry-for", value, "enqueue", "x", "--server", "127.0.0.1:1")
        assert result.returncode == 2, result.stderr
        assert "--retry-for" in result.stderr
        assert "Traceback" not in result.stderr

    @pytest.mark.parametrize(
        "option",
        [
            "--enqueue-stream-idle",
            "--lease-ttl",
            "--rate-limit",
            "--keepalive-interval",
            "--keepalive-timeout",
            "--http-request-head-timeout",
            "--http-answer-timeout",
            "--http-keepalive-timeout",
        ],
    )
    def test_server_durations_and_rates_refuse_non_finite_numbers(self, option):
        result = run("server", option, "inf")
        assert result.returncode == 2, result.stderr
        assert option in result.stderr
        assert "Traceback" not in result.stderr

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("--http-max-connections", "0"),
            ("--http-max-connections", "many"),
            ("--http-request-head-timeout", "0"),
            ("--http-answer-timeout", "-1"),
            ("--http-keepalive-timeout", "nan"),
        ],
    )
    def test_server_http_limits_refuse_what_would_serve_nothing(self, option, value):
        """A usage error naming the option, from the flag or its environment variable."""
        # Should the value get through, the server fails at once on its bad address (exit
        # 1), instead of serving on the default ports with an embedded database.
        nowhere = ("--database-url", "postgresql://127.0.0.1:1/x", "--grpc-listen", "nowhere")
        from_flag = run("server", *nowhere, option, value, timeout=20)
        variable = "CONVEYOR_" + option.removeprefix("--").replace("-", "_").upper()
        from_environment = run("server", *nowhere, timeout=20, **{variable: value})
        for result in (from_flag, from_environment):
            assert result.returncode == 2, result.stderr
            assert option in result.stderr
            assert "Traceback" not in result.stderr

    @pytest.mark.parametrize(
        ("args", "option"),
        [
            # Bytes that are not UTF-8 (Python hands them over as lone surrogates): exit 1
            # with a client-side message, or protobuf's traceback before that.
            (("tasks", "list", "--page-token", "\udcff"), "--page-token"),
            (("workers", "list", "--page-token", "\udcff"), "--page-token"),
            # Past the request's uint64: exit 1, as if the server had refused it.
            (("tasks", "cancel", "--state", "queued", "--limit", str(2**64), "-y"), "--limit"),
            (("tasks", "retry", "--state", "failed", "--limit", str(2**64), "-y"), "--limit"),
        ],
        ids=["tasks-page-token", "workers-page-token", "cancel-limit", "retry-limit"],
    )
    def test_task_and_worker_listings_and_bulk_actions_refuse_what_cannot_travel(
        self, args, option
    ):
        """A usage error (exit 2) naming the option, before anything is sent."""
        result = run(*args, "--server", "127.0.0.1:1")
        assert result.returncode == 2, result.stderr
        assert option in result.stderr
        assert "Traceback" not in result.stderr

    @pytest.mark.parametrize("value", ["-1", "nan", "1e300"])
    def test_dev_drain_timeout_refuses_what_is_no_duration(self, value):
        # Should the value get through, dev fails at once on its address (exit 1) instead
        # of starting an embedded PostgreSQL.
        result = run("dev", "--grpc-listen", "0.0.0.0:1", "--drain-timeout", value, timeout=20)
        assert result.returncode == 2, result.stderr
        assert "--drain-timeout" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow
class TestServerCommands:
    def test_migrate_applies_then_reports_up_to_date(self, empty_database_url):
        migrations = migrate.available_migrations()
        out = assert_ok(run("migrate", "--database-url", empty_database_url))
        assert out.splitlines() == [f"applied {m.version:04d}_{m.name}" for m in migrations]
        assert out.splitlines()[0] == "applied 0001_initial"
        out = assert_ok(run("migrate", "--database-url", empty_database_url))
        assert out.splitlines() == [f"schema is up to date (version {migrations[-1].version})"]

    def test_migrate_behind_a_long_transaction_gives_up_and_applies_nothing(self, database_url):
        """Before: `conveyor migrate` waited behind the transaction as long as it ran (a
        pg_dump: hours), and every claim and enqueue waited behind it."""
        run_sql(database_url, *BACK_TO_SCHEMA_11)
        backup = (
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM conveyor_tasks"
        )
        with holding(database_url, backup, application_name="pg_dump") as backup_pid:
            result = run(
                "migrate",
                "--database-url",
                database_url,
                "--lock-timeout",
                "0.2",
                "--lock-attempts",
                "2",
            )
        assert result.returncode == 1, result
        assert result.stdout == ""
        *retries, error = result.stderr.splitlines()
        # One warning per attempt that is tried again, then the error in one line.
        assert len(retries) == 1, result.stderr
        assert (
            "0012_no_running_worker_index waited 0.2 s for a lock (attempt 1 of 2)" in (retries[0])
        )
        assert error.startswith(
            "error: migration 0012_no_running_worker_index could not get its table lock: "
            "2 waits of 0.2 s each timed out"
        ), error
        assert f"blocked by pid {backup_pid} (application 'pg_dump', idle in transaction" in error
        assert f"SELECT pg_terminate_backend({backup_pid})" in error
        versions = Db(database_url).fetch("SELECT version FROM conveyor_schema_migrations")
        assert sorted(row["version"] for row in versions) == list(range(1, 12))

    def test_migrate_leaves_a_compatible_newer_schema_alone(self, database_url):
        """A rollback's (or an old deploy job's) `migrate` after a newer release migrated."""
        latest = migrate.latest_version()
        Db(database_url).execute(
            "INSERT INTO conveyor_schema_migrations (version, name, oldest_compatible_schema) "
            "VALUES ($1, 'next', $2)",
            latest + 1,
            latest,
        )
        out = assert_ok(run("migrate", "--database-url", database_url))
        assert out == (
            f"nothing to apply: the schema is version {latest + 1}, newer than this Conveyor "
            f"({latest}), and its newer migrations all say this release runs correctly on it\n"
        )

    @pytest.mark.parametrize(
        "args",
        [
            ["dev", "--grpc-listen", "127.0.0.1:\N{SUPERSCRIPT TWO}"],
            [
                "server",
                "--database-url",
                "postgresql://c@127.0.0.1:1/c",
                "--http-listen",
                ":\u0668",
            ],
        ],
        ids=["dev", "server"],
    )
    def test_a_listen_port_of_other_digits_is_a_usage_error(self, args, tmp_path):
        """Before: "²" passed str.isdigit() and int() raised ValueError, a traceback. A
        usage error naming the flag, before any database starts."""
        result = run(*args, cwd=tmp_path, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert f"Invalid value for {args[-2]}: expected HOST:PORT" in result.stderr
        assert not (tmp_path / ".conveyor").exists()

    def test_server_refuses_an_unmigrated_database(self, empty_database_url):
        result = run(
            "server",
            "--database-url",
            empty_database_url,
            "--grpc-listen",
            f"127.0.0.1:{free_port()}",
            "--http-listen",
            f"127.0.0.1:{free_port()}",
        )
        line = assert_one_error_line(result)
        assert "conveyor migrate" in line

    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("notaurl", "expected postgresql://"),
            ("postgresql://localhost/conveyor?sslmode=bogus", "`sslmode` parameter must be"),
            ("postgresql://localhost:99999/conveyor", "port '99999' is not a number"),
            # Digits to str.isdigit(): "²" made int() raise (a traceback), "٨٠" read as 80.
            ("postgresql://localhost:\N{SUPERSCRIPT TWO}/conveyor", "is not a number"),
            ("postgresql://localhost/conveyor?port=\u0668\u0660", "is not a number"),
        ],
        ids=["not-a-url", "bad-sslmode", "port-out-of-range", "superscript-port", "arabic-port"],
    )
    @pytest.mark.parametrize("command", ["migrate", "server"])
    def test_a_malformed_database_url_fails_at_once_in_one_line(self, command, url, expected):
        """Before: migrate printed asyncpg's ClientConfigurationError traceback, and server
        retried for 30 s ("database not reachable") as if the database were down; port
        99999 was taken modulo 65536 and refused as port 34463."""
        began = time.monotonic()
        line = assert_one_error_line(
            run(
                command,
                "--database-url",
                url,
                *(
                    ("--grpc-listen", f"127.0.0.1:{free_port()}", "--http-listen", "127.0.0.1:0")
                    if command == "server"
                    else ()
                ),
                timeout=60,
            )
        )
        assert line.startswith("error: invalid database URL: "), line
        assert expected in line
        # At once: a process start, not a start-up timeout of retries.
        assert time.monotonic() - began < 10

    @pytest.mark.parametrize(
        "refused",
        [
            lambda url: with_user(url, f"nosuchrole_{uuid.uuid4().hex[:8]}"),
            lambda url: f"{url}&no_such_setting=1" if "?" in url else f"{url}?no_such_setting=1",
        ],
        ids=["unknown-role", "unknown-setting"],
    )
    def test_server_refused_by_postgresql_fails_at_once_in_one_line(self, database_url, refused):
        """PostgreSQL answered no (no such role, an unknown setting in the URL): no retry can
        fix it. Before: the server printed asyncpg's traceback."""
        began = time.monotonic()
        line = assert_one_error_line(
            run(
                "server",
                "--database-url",
                refused(database_url),
                "--grpc-listen",
                f"127.0.0.1:{free_port()}",
                "--http-listen",
                "127.0.0.1:0",
                timeout=60,
            )
        )
        assert line.startswith("error: PostgreSQL refused the connection: "), line
        assert time.monotonic() - began < 10

    @pytest.mark.parametrize("listener", ["gRPC", "HTTP"])
    def test_server_on_a_port_in_use_is_one_error_line(self, database_url, listener):
        """Before: an OSError traceback (HTTP) or gRPC's RuntimeError "Failed to bind"."""
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            taken = f"127.0.0.1:{holder.getsockname()[1]}"
            listen = {"gRPC": f"127.0.0.1:{free_port()}", "HTTP": f"127.0.0.1:{free_port()}"}
            listen[listener] = taken
            result = run(
                "server",
                "--database-url",
                database_url,
                "--grpc-listen",
                listen["gRPC"],
                "--http-listen",
                listen["HTTP"],
                timeout=30,
            )
        line = assert_one_error_line(result)
        assert line == f"error: cannot listen on {taken} for {listener}: address already in use"

    def test_server_on_the_grpc_port_of_a_running_server_is_refused(self, server, database_url):
        """gRPC binds with SO_REUSEPORT unless told not to: before, a second server on the
        port of a first started without a word, and the two shared its connections."""
        result = run(
            "server",
            "--database-url",
            database_url,
            "--grpc-listen",
            server.address,
            "--http-listen",
            f"127.0.0.1:{free_port()}",
            timeout=30,
        )
        line = assert_one_error_line(result)
        assert line == f"error: cannot listen on {server.address} for gRPC: address already in use"

    def test_server_timing_flags_that_disagree_are_named_as_flags(self):
        """Before: "heartbeat_interval must be at most half of lease_ttl", internal names."""
        line = assert_one_error_line(
            run("server", "--lease-ttl", "3", "--heartbeat-interval", "5", timeout=30)
        )
        assert line.startswith(
            "error: --heartbeat-interval (5) must be at most half of --lease-ttl (3)"
        )
        line = assert_one_error_line(
            run(
                "server",
                "--lease-ttl",
                "40",
                "--heartbeat-interval",
                "16",
                "--worker-lost-after",
                "15",
                timeout=30,
            )
        )
        assert line.startswith(
            "error: --worker-lost-after (15) must be at least twice --heartbeat-interval (16)"
        )

    def test_worker_with_unknown_module(self):
        line = assert_one_error_line(
            run("worker", "nosuchmodule:worker", "--server", "127.0.0.1:1")
        )
        assert "nosuchmodule" in line

    def test_worker_with_a_broken_module_names_the_file_and_line(self, tmp_path):
        """Before: a SyntaxError was a traceback, and an ImportError inside the module one
        line that did not say which file failed."""
        package = tmp_path / "myapp"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "syntax.py").write_text("worker = None\ndef broken(:\n")
        (package / "imports.py").write_text('"""Tasks."""\n\nimport nonexistent_mod\n')
        (package / "fails.py").write_text("def setup():\n    return 1 / 0\n\n\nsetup()\n")
        (package / "exits.py").write_text("import sys\n\nsys.exit(3)\n")
        for spec, expected in (
            (
                "myapp.syntax:worker",
                (
                    "error: cannot import 'myapp.syntax': SyntaxError: invalid syntax "
                    "(at myapp/syntax.py:2)"
                ),
            ),
            (
                "myapp.imports:worker",
                (
                    "error: cannot import 'myapp.imports': ModuleNotFoundError: No module named "
                    "'nonexistent_mod' (at myapp/imports.py:3)"
                ),
            ),
            (
                "myapp.fails:worker",
                (
                    "error: cannot import 'myapp.fails': ZeroDivisionError: division by zero "
                    "(at myapp/fails.py:2)"
                ),
            ),
            (
                # Before: the command ended with status 3 and no word.
                "myapp.exits:worker",
                "error: cannot import 'myapp.exits': SystemExit: 3 (at myapp/exits.py:3)",
            ),
            (
                "myapp.missing:worker",
                "error: cannot import 'myapp.missing': No module named 'myapp.missing'",
            ),
        ):
            result = run("worker", spec, "--server", "127.0.0.1:1", cwd=tmp_path)
            assert assert_one_error_line(result) == expected

    @pytest.mark.parametrize(
        "source",
        [
            # An exception whose message cannot be read.
            (
                "class Broken(Exception):\n    def __str__(self):\n        raise ValueError\n\n"
                "raise Broken()\n"
            ),
            # Cancelled asyncio code run at import.
            "import asyncio\n\nraise asyncio.CancelledError('setup was cancelled')\n",
            # A library's own BaseException.
            "class Stop(BaseException):\n    pass\n\nraise Stop('from a library')\n",
        ],
        ids=["unreadable-message", "cancelled-error", "base-exception"],
    )
    def test_any_import_failure_is_one_error_line(self, source, tmp_path):
        """Before: each of these was a traceback of this command, although an error is
        "printed as one line, never a traceback" (getting-started.md)."""
        (tmp_path / "fails_oddly.py").write_text(source)
        result = run("worker", "fails_oddly:worker", "--server", "127.0.0.1:1", cwd=tmp_path)
        line = assert_one_error_line(result)
        assert line.startswith("error: cannot import 'fails_oddly': "), line
        assert "(at fails_oddly.py:" in line, line

    @pytest.mark.parametrize(
        ("source", "env"),
        [
            ("import json\n\nSETTINGS = json.loads('{')\n", {}),
            # Worker() on line 3 reads CONVEYOR_TOKEN_FILE, which names a missing file.
            (
                "from conveyor import Worker\n\nworker = Worker()\n",
                {"CONVEYOR_TOKEN_FILE": "/nonexistent/token"},
            ),
        ],
        ids=["the-standard-library-raises", "conveyor-raises"],
    )
    def test_a_library_raising_at_import_names_the_users_line(self, source, env, tmp_path):
        """Before: the line named the library's file (json/decoder.py:353,
        conveyor/client/channel.py:144), not the line of the user's module that called it."""
        (tmp_path / "app_with_a_bad_line.py").write_text(source)
        result = run(
            "worker", "app_with_a_bad_line:worker", "--server", "127.0.0.1:1", cwd=tmp_path, **env
        )
        assert "(at app_with_a_bad_line.py:3)" in assert_one_error_line(result)

    @pytest.mark.slow
    def test_a_worker_whose_stop_cannot_end_exits_1_saying_why(self, server, client, processes):
        """Before: an async handler blocking the event loop kept the stop from ending, and
        `conveyor worker` exited 0 after the stop's wait without a word, its task left to
        its lease."""
        worker = processes(
            conveyor_command("worker", "worker_apps:loop_blocker", "--server", server.address),
            name="worker-with-a-blocked-loop",
        )
        task_id = client.enqueue_task(Task(type="block_the_loop", payload=b"300"))
        wait_for(
            lambda: client.get_task_status(task_id).state is TaskState.RUNNING,
            timeout=30,
            what="the handler to block the worker's loop",
        )
        worker.signal(signal.SIGTERM)
        assert worker.wait(120) == 1, worker.output()
        assert "did not stop: its event loop is blocked" in worker.output()
        assert "stop_timed_out" in worker.output() or "did not stop within" in worker.output()

    def test_worker_call_timeout_is_the_deadline_of_its_calls(self, processes):
        """Before: a worker's calls waited 10 s for their answer, and no flag changed it.

        The server here never answers (the kernel accepts the connection; nothing reads
        it): the worker's registration gives up after the deadline it was given, and tries
        again. With the old 10 s the first give-up could not come within the wait below.
        """
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            address = f"127.0.0.1:{silent.getsockname()[1]}"
            worker = processes(
                conveyor_command(
                    "worker", "worker_apps:worker", "--server", address, "--call-timeout", "0.5"
                ),
                name="worker-with-a-short-deadline",
            )
            wait_for(
                lambda: "DEADLINE_EXCEEDED" in worker.output(),
                timeout=8,
                what="the registration to give up after its 0.5 s deadline",
            )
            worker.signal(signal.SIGTERM)
            assert worker.wait(30) == 0, worker.output()
        assert f"no server accepted the worker yet ({address}: DEADLINE_EXCEEDED" in (
            worker.output()
        )

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
    def test_a_server_waiting_for_its_database_stops_at_a_signal(self, processes, sig):
        """Before: the signal was ignored while the start retried an unreachable database,
        which ended 30 s later with exit 1; operations.md promised exit 0 at any stage."""
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, never listening: connections refused
            nowhere = f"postgresql://conveyor@127.0.0.1:{closed.getsockname()[1]}/conveyor"
            server = processes(
                conveyor_command(
                    *("server", "--database-url", nowhere),
                    *("--grpc-listen", f"127.0.0.1:{free_port()}"),
                    *("--http-listen", f"127.0.0.1:{free_port()}"),
                ),
                name="server-without-its-database",
            )
            wait_for(
                lambda: "database not reachable, retrying" in server.output(),
                timeout=20,
                what="the server to be retrying its database",
            )
            signalled = time.monotonic()
            server.signal(sig)
            assert server.wait(30) == 0, server.output()
        assert time.monotonic() - signalled < 10, server.output()
        assert "stopped while starting" in server.output()
        assert "Traceback" not in server.output()

    @pytest.mark.parametrize(
        ("variable", "served"),
        [(None, True), ("1", True), ("0", False), ("", False)],
        ids=["unset", "1", "0", "empty"],
    )
    def test_conveyor_dashboard_reads_empty_as_no(self, processes, database_url, variable, served):
        """Before: `CONVEYOR_DASHBOARD=` served the dashboard (click reads an empty
        variable as unset), while operations.md says a yes/no variable's empty is no."""
        http = f"127.0.0.1:{free_port()}"
        env = {} if variable is None else {"CONVEYOR_DASHBOARD": variable}
        server = processes(
            conveyor_command(
                *("server", "--database-url", database_url),
                *("--grpc-listen", f"127.0.0.1:{free_port()}", "--http-listen", http),
            ),
            name="server-dashboard",
            **env,
        )

        def ui_status() -> int | None:
            try:
                with urllib.request.urlopen(f"http://{http}/ui", timeout=2) as response:
                    return int(response.status)
            except urllib.error.HTTPError as refused:
                return refused.code
            except (urllib.error.URLError, OSError):
                assert server.process.poll() is None, server.output()
                return None

        status = wait_for(ui_status, timeout=30, what="the server's HTTP address to answer")
        assert (status == 200) is served, (status, server.output())

    def test_log_level_and_format_in_upper_case_from_the_environment(self):
        """Before: CONVEYOR_LOG_LEVEL=DEBUG was a usage error (exit 2)."""
        result = run("token", "--help", CONVEYOR_LOG_LEVEL="DEBUG", CONVEYOR_LOG_FORMAT="JSON")
        assert result.returncode == 0, result.stderr


@pytest.mark.slow
class TestSecurityCommands:
    def test_token_create_list_revoke_and_use_from_the_environment(
        self, start_server, tmp_path
    ) -> None:
        """The operator's loop: create a token, use it through CONVEYOR_TOKEN, revoke it."""
        tokens = tmp_path / "tokens.toml"
        token = assert_ok(
            run("token", "create", "--file", str(tokens), "--name", "ops", "--role", "admin")
        ).strip()
        assert token.startswith("cvy_")
        assert token not in tokens.read_text()
        assert oct(tokens.stat().st_mode & 0o777) == "0o600"
        producer = assert_ok(
            run("token", "create", "--file", str(tokens), "--name", "app", "--role", "producer")
        ).strip()
        listed = assert_ok(run("token", "list", "--file", str(tokens)))
        assert [line.split()[1:3] for line in listed.splitlines()] == [
            ["admin", "ops"],
            ["producer", "app"],
        ]
        viewer = assert_ok(
            run("token", "create", "--file", str(tokens), "--name", "dash", "--role", "viewer")
        ).strip()
        server = start_server(tokens_file=tokens)
        denied = assert_one_error_line(run("enqueue", "t", "--server", server.address))
        # Where the CLI reads a token from, not the raw "send 'authorization: Bearer ...'".
        assert denied.startswith("error: no token: ")
        assert "set CONVEYOR_TOKEN to the token, or CONVEYOR_TOKEN_FILE to a file" in denied
        task_id = assert_ok(
            run("enqueue", "t", "--server", server.address, CONVEYOR_TOKEN=producer)
        ).strip()
        assert str(uuid.UUID(task_id)) == task_id
        token_file = tmp_path / "admin.token"
        token_file.write_text(token + "\n")
        assert_ok(
            run("tasks", "list", "--server", server.address, CONVEYOR_TOKEN_FILE=str(token_file))
        )
        assert "permission" in assert_one_error_line(
            run("tasks", "list", "--server", server.address, CONVEYOR_TOKEN=producer)
        )
        # The operation asked for, not the enqueue stream the client carries it on.
        assert assert_one_error_line(
            run("enqueue", "t", "--server", server.address, CONVEYOR_TOKEN=viewer)
        ) == (
            "error: EnqueueTasks needs the enqueue permission, which the viewer role of 'dash' "
            "does not have"
        )
        assert_ok(run("token", "revoke", "--file", str(tokens), producer.split("_")[1]))
        assert "app" not in assert_ok(run("token", "list", "--file", str(tokens)))

    def test_a_name_with_a_final_newline_is_refused_and_revoke_leaves_the_file_alone(
        self, tmp_path
    ) -> None:
        """A hand-edited name "keep\\n" (a TOML escape) passed the name check (`$` matches
        before a final newline); `revoke` then wrote the name back with a raw line break,
        a file no server could read, and said it had revoked the token. The servers kept
        their old tokens, the revoked one included."""
        tokens = tmp_path / "tokens.toml"
        for name in ("keep", "gone"):
            assert_ok(
                run("token", "create", "--file", str(tokens), "--name", name, "--role", "admin")
            )
        gone = assert_ok(run("token", "list", "--file", str(tokens))).splitlines()[1].split()[0]
        tokens.write_text(tokens.read_text().replace('name = "keep"', 'name = "keep\\n"'))
        edited = tokens.read_text()

        for command in (("list",), ("revoke", gone)):
            line = assert_one_error_line(run("token", *command, "--file", str(tokens)))
            assert "token name must be" in line, line
        assert tokens.read_text() == edited

    def test_create_appends_to_a_hand_edited_file_and_list_shows_utc(self, tmp_path) -> None:
        tokens = tmp_path / "tokens.toml"
        # Edited by hand: a comment, and no newline at the end.
        tokens.write_text("# conveyor tokens, managed by hand")
        assert_ok(run("token", "create", "--file", str(tokens), "--name", "ops", "--role", "admin"))
        with tokens.open("a") as file:
            file.write(
                '\n[[token]]\nid = "0a1b2c3d"\nname = "tokyo"\nrole = "viewer"\n'
                f'sha256 = "{"0" * 64}"\nexpires = 2030-01-31T00:00:00+09:00'
            )
        assert_ok(
            run("token", "create", "--file", str(tokens), "--name", "app", "--role", "producer")
        )
        listed = assert_ok(run("token", "list", "--file", str(tokens))).splitlines()
        assert [line.split()[2] for line in listed] == ["ops", "tokyo", "app"]
        assert "expires 2030-01-30 15:00 UTC" in listed[1]

    def test_worker_token_limited_to_types_and_bad_arguments(self, tmp_path) -> None:
        tokens = tmp_path / "tokens.toml"
        assert_ok(
            run(
                "token",
                "create",
                "--file",
                str(tokens),
                "--name",
                "mailers",
                "--role",
                "worker",
                "--task-type",
                "send_email",
                "--expires-in-days",
                "30",
            )
        )
        assert "send_email" in assert_ok(run("token", "list", "--file", str(tokens)))
        assert "only worker tokens" in assert_one_error_line(
            run(
                "token",
                "create",
                "--file",
                str(tokens),
                "--name",
                "x",
                "--role",
                "viewer",
                "--task-type",
                "a",
            )
        )
        assert "token name must be" in assert_one_error_line(
            run("token", "create", "--file", str(tokens), "--name", "a b", "--role", "admin")
        )
        assert "no token with id" in assert_one_error_line(
            run("token", "revoke", "--file", str(tokens), "00000000")
        )

    def test_server_refuses_a_non_loopback_address_without_tls_and_tokens(
        self, database_url
    ) -> None:
        """It says why and how to fix it, and exits 1 before touching anything."""
        line = assert_one_error_line(
            run("server", "--database-url", database_url, "--grpc-listen", "0.0.0.0:0")
        )
        assert "not a loopback address" in line
        assert "--insecure" in line

    def test_without_a_database_url_it_refuses_before_the_embedded_postgres_starts(
        self, tmp_path
    ) -> None:
        """The refusal came after "No database URL given: using the embedded PostgreSQL"
        and the embedded cluster's start: every setting is now checked first."""
        line = assert_one_error_line(run("server", "--grpc-listen", "0.0.0.0:0", cwd=tmp_path))
        assert "not a loopback address" in line
        assert not (tmp_path / ".conveyor").exists()
