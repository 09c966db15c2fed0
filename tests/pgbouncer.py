"""A real PgBouncer in front of the test cluster, for the pooling-proxy tests.

`PgBouncer(database_url, pool_mode=...)` starts Debian's `pgbouncer` on a free loopback
port, forwarding every database to the cluster `database_url` points at, and `url` is
`database_url` through it. Stock settings otherwise (above all no
`ignore_startup_parameters`): what an operator who installs the package gets. PgBouncer
refuses to run as root, so as root it runs as the user who can reach the cluster: the owner
of its socket directory (the embedded cluster's system user), or `nobody` over TCP.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from helpers import free_port, wait_for

BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def available() -> bool:
    """Whether PgBouncer is installed here (.ci/run installs it)."""
    return os.access(BINARY, os.X_OK)


class PgBouncer:
    """One PgBouncer process; a context manager that stops it and deletes its files."""

    def __init__(
        self,
        database_url: str,
        *,
        pool_mode: str = "session",
        pool_size: int = 60,
        serve_database: str | None = None,
    ) -> None:
        """Start it, and wait until it accepts connections.

        `pool_size` PostgreSQL connections per database and user, at most; the default
        leaves room for a server's pools, its LISTEN connection and a test's own sessions.
        `serve_database`: connect every client to this database, whatever it asks for.
        """
        parts = urlsplit(database_url)
        query = parse_qs(parts.query)
        socket_dir = query.get("host", [""])[0]
        host = socket_dir or parts.hostname or "127.0.0.1"
        port = parts.port or 5432
        self.user = parts.username or "postgres"
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        target = f"host={host} port={port}"
        if serve_database:
            target += f" dbname={serve_database}"
        (self._dir / "users.txt").write_text(f'"{self.user}" ""\n')
        (self._dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = {target}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            f"unix_socket_dir = {self._dir}\n"
            "auth_type = trust\n"
            f"auth_file = {self._dir / 'users.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 300\n"
            f"logfile = {self._dir / 'pgbouncer.log'}\n"
        )
        argv = [BINARY, str(self._dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            owner = Path(socket_dir).stat().st_uid if socket_dir else pwd.getpwnam("nobody").pw_uid
            os.chown(self._dir, owner, -1)
            for child in self._dir.iterdir():
                os.chown(child, owner, -1)
            argv = ["runuser", "-u", pwd.getpwuid(owner).pw_name, "--", *argv]
        self._process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            wait_for(self._accepting, timeout=10, what=f"PgBouncer on port {self.port}")
        except BaseException:
            self.stop()
            raise
        self.url = urlunsplit(
            parts._replace(
                netloc=f"{self.user}@127.0.0.1:{self.port}",
                query=urlencode({k: v for k, v in query.items() if k != "host"}, doseq=True),
            )
        )

    def _accepting(self) -> bool:
        if self._process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited {self._process.returncode}:\n{self.log()}")
        return "listening on 127.0.0.1" in self.log()

    def log(self) -> str:
        """What PgBouncer logged so far."""
        with contextlib.suppress(OSError):
            return (self._dir / "pgbouncer.log").read_text()
        return ""

    def stop(self) -> None:
        """Stop it at once and clean up (SIGTERM: before 1.23, SIGINT waits for clients)."""
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        """Itself, running."""
        return self

    def __exit__(self, *_exc: object) -> None:
        """Stop it."""
        self.stop()
