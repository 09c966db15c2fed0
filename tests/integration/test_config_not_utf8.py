"""Settings holding bytes that are not UTF-8 are one error line.

Python hands an argument or environment variable that does not decode to the program as
lone surrogates (surrogateescape). `WireText` (cli/params.py) turns that into a usage error
for the texts sent to a server, and most settings refused it with one `error:` line; these
did not: they ended in a traceback (and two of them in half a minute of tracebacks and a
wrong diagnosis, "cannot reach PostgreSQL"). `types.utf8_text` and the surrogate category
among the unprintable ones refuse them now.
"""

from __future__ import annotations

import time

import pytest
from helpers import run_cli as run
from helpers import server_argv

BAD = "\udcff"  # the byte 0xff as Python hands it over


def assert_clear_error(result, *, elapsed: float, within: float = 15.0) -> str:
    """A non-zero status, no traceback, a short diagnosis, in bounded time."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert elapsed < within, f"took {elapsed:.1f}s:\n{result.stderr[-2000:]}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) <= 4, result.stderr[-3000:]
    return result.stderr


def timed(*args: str, **env: str):
    started = time.monotonic()
    result = run(*args, timeout=120, **env)
    return result, time.monotonic() - started


class TestServer:
    def test_session_secret_not_utf8(self, database_url):
        """CONVEYOR_SESSION_SECRET=$'\\xff': `secret.encode()` raised UnicodeEncodeError."""
        result, elapsed = timed(
            *server_argv(database_url),
            CONVEYOR_SESSION_SECRET=f"secret{BAD}",
        )
        err = assert_clear_error(result, elapsed=elapsed)
        assert "CONVEYOR_SESSION_SECRET" in err

    def test_server_id_not_utf8(self, database_url):
        """--server-id $'\\xff' passed the printable check (a surrogate is no control
        character) and became the connections' application_name: every connection attempt
        logged an asyncpg traceback for half a minute, then 'cannot reach PostgreSQL'."""
        result, elapsed = timed(
            *server_argv(
                database_url,
                "--server-id",
                f"srv{BAD}",
            ),
        )
        err = assert_clear_error(result, elapsed=elapsed)
        assert "server" in err.lower()
        assert "cannot reach PostgreSQL" not in err


class TestDatabaseUrl:
    def test_user_not_utf8(self, database_url):
        """A URL whose user name holds a byte that is not UTF-8: asyncpg's tracebacks, then
        'cannot reach PostgreSQL: connection was closed in the middle of operation'."""
        # Now: one line naming the URL (not repeating it: it may hold a password).
        scheme, _, rest = database_url.partition("://")
        at = rest.find("@")
        bad_url = f"{scheme}://x{BAD}{rest[at:]}" if at >= 0 else f"{scheme}://x{BAD}@{rest}"
        result, elapsed = timed("migrate", CONVEYOR_DATABASE_URL=bad_url)
        err = assert_clear_error(result, elapsed=elapsed)
        assert "cannot reach PostgreSQL" not in err


class TestWorkerAndClients:
    @pytest.mark.parametrize(
        ("args", "env"),
        [
            (("worker", "worker_apps:worker", "--server", f"h{BAD}:50051"), {}),
            (("worker", "worker_apps:worker"), {"CONVEYOR_SERVER": f"h{BAD}:50051"}),
            (("stats", "--once"), {"CONVEYOR_SERVER": f"h{BAD}:50051"}),
            (("enqueue", "demo.echo", "--server", f"h{BAD}:50051"), {}),
            (
                (
                    "worker",
                    "worker_apps:worker",
                    "--server",
                    "127.0.0.1:1",
                    "--metrics-port",
                    "0",
                    "--metrics-host",
                    f"h{BAD}",
                ),
                {},
            ),
            (
                ("worker", "worker_apps:worker", "--server", "127.0.0.1:1"),
                {"CONVEYOR_TLS": "1", "CONVEYOR_TLS_SERVER_NAME": f"h{BAD}"},
            ),
        ],
        ids=[
            "worker-server-flag",
            "worker-server-env",
            "stats-server-env",
            "enqueue-server-flag",
            "worker-metrics-host",
            "worker-tls-server-name",
        ],
    )
    def test_not_utf8_is_one_error_line(self, args, env):
        result, elapsed = timed(*args, **env)
        assert_clear_error(result, elapsed=elapsed)
