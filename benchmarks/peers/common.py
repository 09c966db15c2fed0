"""Shared plumbing for the peer adapters (PgQueuer, Procrastinate, Dramatiq, Celery).

Each adapter is run by the harness as

    .venv/bin/python benchmarks/peers/<system>.py --workload W --pg-url URL --redis-url URL
        [--tasks N] [--rate R] [--seconds S]

and prints exactly one JSON object on its last stdout line. Everything else (logs, worker
output) goes to stderr.

Timing is the same for every system: the task function records ``time.time()`` at its start
and at its end and appends one line ``<task id> <start> <finish>`` to a file opened with
``O_APPEND`` (one ``write`` per line, atomic for short lines on Linux). Workers find the file
through the ``PEER_BENCH_TIMING_FILE`` environment variable, inherited from the adapter.

An adapter file is named after the library it benchmarks, so when run as a script it would
shadow that library (``sys.path[0]`` is this directory). Each adapter therefore replaces
``sys.path[0]`` with ``benchmarks/`` before importing anything else, and imports this module
as ``peers.common``; worker processes get ``benchmarks/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Self

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

WORKLOADS = ("w1", "w2", "w3-single", "w3-concurrent", "w3-bulk")
TIMING_ENV = "PEER_BENCH_TIMING_FILE"
BENCHMARKS_DIR = Path(__file__).resolve().parents[1]
CONCURRENT_PRODUCERS = 32
# Worker processes, the same number for every system (conveyor_workloads.py too): one per
# core, and at least 2 so a single-core machine still runs several; run.py prints it.
WORKER_PROCESSES = max(2, os.cpu_count() or 1)
DEFAULT_HARD_TIMEOUT = 600.0
WATCHDOG_GRACE = 20.0  # seconds past the hard timeout before the watchdog thread steps in
# W2, every system (conveyor_workloads.py too): how long after the last send the tasks may
# take to finish. A task not finished by then is lost, and a run that lost one has failed.
POST_LOAD_WAIT = 60.0
# W2's warm-up, every system: this many timed tasks (ids below zero, left out of the result)
# run before the load, then a pause so the slower worker process is up too.
WARM_UP_TASKS = 20
WARM_UP_SETTLE = 2.0
WARM_UP_TIMEOUT = 60.0
# W2, every system: the producer is open loop, each call sent at its scheduled time with up
# to this many in flight, as many as W3's concurrent producers. A producer that waited for
# each call sent below the rate once a call outlasted the interval (PgQueuer's "1,000/s"
# went out at 372-768/s), and the delay of the calls it held back was never measured.
W2_IN_FLIGHT = CONCURRENT_PRODUCERS


# --- Arguments and output ----------------------------------------------------------------


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the harness contract's arguments (plus a few adapter-internal ones)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", choices=WORKLOADS)
    parser.add_argument("--pg-url", default=os.environ.get("CONVEYOR_TEST_DATABASE_URL", ""))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--tasks", type=int, default=20_000, help="w1: tasks pre-queued")
    parser.add_argument("--rate", type=float, default=200.0, help="w2: enqueues per second")
    parser.add_argument(
        "--seconds", type=float, default=None, help="w2: 30 by default; w3: 10 by default"
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="w3-bulk: tasks per call")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_HARD_TIMEOUT,
        help="hard limit on the whole run, in seconds; workers are killed when it expires",
    )
    # Internal: the adapter re-executes itself with --role worker to start a worker process.
    parser.add_argument("--role", choices=("bench", "worker"), default="bench")
    args = parser.parse_args(argv)
    if args.role == "bench" and args.workload is None:
        parser.error("--workload is required")
    if args.seconds is None:
        args.seconds = 30.0 if args.workload == "w2" else 10.0
    return args


def log(message: str) -> None:
    """Write a progress line to stderr (stdout is reserved for the result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """Print the result as the last stdout line."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def unsupported(reason: str) -> dict[str, Any]:
    """The result of a workload the system cannot run."""
    return {"unsupported": reason}


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 by the nearest-rank method (None when there are no values)."""
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(values)
    result: dict[str, float | None] = {}
    for name, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        rank = max(1, math.ceil(fraction * len(ordered)))
        result[name] = round(ordered[rank - 1], 3)
    return result


class HardTimeoutError(Exception):
    """The run exceeded its hard time limit."""


def _on_alarm(signum: int, frame: object) -> NoReturn:
    del frame
    if signum == signal.SIGTERM:
        raise HardTimeoutError("terminated (SIGTERM)")
    raise HardTimeoutError("hard timeout expired")


def main_wrapper(
    run: Callable[[argparse.Namespace], dict[str, Any]],
    description: str,
    worker: Callable[[argparse.Namespace], None] | None = None,
) -> None:
    """Parse arguments, run the workload under a hard timeout, and print its JSON result.

    ``run`` must stop every process it started (use :class:`Processes` as a context manager).
    On an exception, ``{"error": ...}`` is printed and the exit status is 1. With
    ``--role worker``, ``worker`` runs instead (killed by SIGALRM at the hard timeout).
    """
    args = parse_args(description)
    if args.role == "worker":
        if worker is None:
            sys.exit("this adapter has no worker role")
        signal.setitimer(signal.ITIMER_REAL, args.timeout)  # default action: terminate
        worker(args)
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_alarm)  # the harness giving up: clean up the same way
    signal.setitimer(signal.ITIMER_REAL, args.timeout)
    # Backstop for an event loop that swallows the SIGALRM exception (uvloop does).
    watchdog = threading.Timer(args.timeout + WATCHDOG_GRACE, _watchdog_exit)
    watchdog.daemon = True
    watchdog.start()
    try:
        result = run(args)
    except BaseException as exc:
        signal.setitimer(signal.ITIMER_REAL, 0)
        traceback.print_exc(file=sys.stderr)
        if isinstance(exc, TimeoutError):  # asyncio.wait_for in the async adapters
            emit({"error": f"HardTimeoutError: hard timeout of {args.timeout:g} s expired"})
        else:
            emit({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
    finally:
        watchdog.cancel()
    signal.setitimer(signal.ITIMER_REAL, 0)
    emit(result)


def _watchdog_exit() -> None:
    """Kill every worker group, report the timeout and exit at once (from a thread)."""
    for procs in _live:
        for proc in procs.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    log("watchdog: hard timeout expired; workers killed")
    emit({"error": "HardTimeoutError: hard timeout expired (watchdog)"})
    os._exit(1)


# --- Timing file -------------------------------------------------------------------------

_timing_fd: int | None = None
_timing_lock = threading.Lock()


def record(task_id: int, started: float, finished: float) -> None:
    """Append one timing line for a task; called inside the task function, in the worker."""
    global _timing_fd  # noqa: PLW0603 - one descriptor per worker process, opened lazily
    if _timing_fd is None:
        with _timing_lock:
            if _timing_fd is None:
                _timing_fd = os.open(os.environ[TIMING_ENV], os.O_WRONLY | os.O_APPEND)
    os.write(_timing_fd, f"{task_id} {started:.6f} {finished:.6f}\n".encode())


@contextlib.contextmanager
def timing_file() -> Iterator[Path]:
    """Create an empty timing file, export its path to workers, and delete it afterwards."""
    fd, name = tempfile.mkstemp(prefix="peer-bench-", suffix=".timings")
    os.close(fd)
    path = Path(name)
    path.chmod(0o666)  # workers may run as another user
    os.environ[TIMING_ENV] = str(path)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


class TimingReader:
    """The timing file read as it grows: each task's first line, and how many lines repeat one.

    A task whose line appears twice ran twice (a redelivery). Its first run is the one
    timed, and the repeats are counted, not taken for other tasks. Each read parses only
    the lines added since the last, so polling a long run costs the machine little.
    """

    def __init__(self, path: Path) -> None:
        """Start at the beginning of ``path``."""
        self.path = path
        self.offset = 0
        self.timings: dict[int, tuple[float, float]] = {}
        self.duplicates = 0

    def read(self) -> dict[int, tuple[float, float]]:
        """Task id -> (start, finish), from the complete lines written so far."""
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data.rfind(b"\n") + 1
        self.offset += complete
        for line in data[:complete].split(b"\n"):
            parts = line.split()
            if len(parts) == 3:
                task_id = int(parts[0])
                if task_id in self.timings:
                    self.duplicates += 1
                else:
                    self.timings[task_id] = (float(parts[1]), float(parts[2]))
        return self.timings


def wait_for_tasks(
    path: Path, expected: int, timeout: float, alive: Callable[[], None] | None = None
) -> int:
    """Wait until ``expected`` distinct tasks ran or ``timeout`` passes; return how many ran.

    Distinct task ids, not lines: a task run twice must not stand in for one never run.
    ``alive`` is called on each poll and should raise if the workers died.
    """
    reader = TimingReader(path)
    deadline = time.monotonic() + timeout
    last_count, last_progress = -1, time.monotonic()
    while True:
        count = len(reader.read())
        if count >= expected:
            return count
        now = time.monotonic()
        if count != last_count:
            last_count, last_progress = count, now
        if now >= deadline:
            log(f"timed out waiting for tasks: {count}/{expected} done")
            return count
        if now - last_progress > 60:
            log(f"no progress for 60 s: {count}/{expected} done")
            return count
        if alive is not None:
            alive()
        time.sleep(0.05)


def w1_result(path: Path, expected: int) -> dict[str, Any]:
    """Tasks/s from the first task start to the last task finish."""
    reader = TimingReader(path)
    timings = reader.read()
    if len(timings) < expected:
        raise RuntimeError(f"only {len(timings)} of {expected} tasks completed")
    first_start = min(start for start, _ in timings.values())
    last_finish = max(finish for _, finish in timings.values())
    return {
        "tasks_per_second": round(len(timings) / (last_finish - first_start), 1),
        "tasks": len(timings),
        "seconds": round(last_finish - first_start, 3),
        "duplicates": reader.duplicates,
    }


def w2_result(path: Path, sent: Sent) -> dict[str, Any]:
    """Enqueue->start and enqueue->finish percentiles in milliseconds, and the rate sent."""
    reader = TimingReader(path)
    timings = reader.read()
    start_ms, finish_ms = [], []
    for task_id, before_enqueue in sent.enqueued_at.items():
        if task_id in timings:
            started, finished = timings[task_id]
            start_ms.append((started - before_enqueue) * 1000)
            finish_ms.append((finished - before_enqueue) * 1000)
    result: dict[str, Any] = {
        "start_ms": percentiles(start_ms),
        "finish_ms": percentiles(finish_ms),
        "tasks": len(start_ms),
        "achieved_rate": sent.achieved_rate,
        "worst_late_ms": round(sent.worst_late * 1000, 1),
        "duplicates": reader.duplicates,
    }
    if len(start_ms) < len(sent.enqueued_at):
        result["lost"] = len(sent.enqueued_at) - len(start_ms)
    return result


def throughput(count: int, elapsed: float) -> dict[str, Any]:
    """A w3 result."""
    return {"tasks_per_second": round(count / elapsed, 1), "tasks": count}


# --- Producers ---------------------------------------------------------------------------


@dataclass
class Sent:
    """What a W2 producer sent: each task's send time, and how far the sends fell behind."""

    enqueued_at: dict[int, float] = field(default_factory=dict)  # i -> time.time() before call
    worst_late: float = 0.0  # seconds: the latest send past its scheduled time

    @property
    def achieved_rate(self) -> float | None:
        """Sends per second between the first send and the last (None for fewer than 2).

        A producer whose calls all stay open longer than ``W2_IN_FLIGHT`` intervals sends
        slower than the target; this is the rate it really sent at.
        """
        if len(self.enqueued_at) < 2:
            return None
        stamps = self.enqueued_at.values()
        span = max(stamps) - min(stamps)
        return round((len(self.enqueued_at) - 1) / span, 1) if span > 0 else None

    def stamp(self, i: int, due: float) -> None:
        """Record that call ``i``, due at monotonic time ``due``, goes out now."""
        self.worst_late = max(self.worst_late, time.monotonic() - due)
        self.enqueued_at[i] = time.time()


def _schedule(rate: float, seconds: float) -> Iterator[tuple[int, float]]:
    """(i, monotonic time call i is due) for ``rate`` calls a second over ``seconds``.

    The schedule does not slip when a call is slow: a late call goes out at once and the
    next keeps its own time. A producer with every call slot busy still falls behind it;
    :class:`Sent` shows what it achieved.
    """
    t0 = time.monotonic()
    for i in range(int(rate * seconds)):
        yield i, t0 + i / rate


def paced(
    rate: float,
    seconds: float,
    make_enqueue: Callable[[], Callable[[int], object]],
    in_flight: int = W2_IN_FLIGHT,
) -> Sent:
    """Call ``enqueue(i)`` at ``rate`` per second for ``seconds``, open loop.

    Call ``i`` is handed at its scheduled time to one of ``in_flight`` producer threads,
    each with its own enqueue function from ``make_enqueue`` (called in that thread), and
    stamped there just before the call. So a call slower than the interval delays no other
    call while a thread is free; with all of them busy the call waits, and ``worst_late``
    says so.
    """
    producers = _ProducerThreads(make_enqueue, in_flight)
    for i, due in _schedule(rate, seconds):
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        producers.due_calls.put((i, due))
    return producers.finish()


class _ProducerThreads:
    """:func:`paced`'s threads: each takes the next due call, stamps it and makes it."""

    def __init__(self, make_enqueue: Callable[[], Callable[[int], object]], count: int) -> None:
        import queue  # noqa: PLC0415 - only the blocking adapters need it

        self.make_enqueue = make_enqueue
        self.sent = Sent()
        self.due_calls: queue.SimpleQueue[tuple[int, float] | None] = queue.SimpleQueue()
        self.errors: list[BaseException] = []
        self._stamp_lock = threading.Lock()
        self._ready = threading.Barrier(count + 1)
        self._threads = [threading.Thread(target=self._produce, daemon=True) for _ in range(count)]
        for thread in self._threads:
            thread.start()
        try:
            self._ready.wait()  # every thread has its enqueue function
        except threading.BrokenBarrierError:
            # A thread could not build its enqueue function: say why, not that the barrier
            # broke (the other threads leave the broken barrier too).
            raise RuntimeError(f"a producer failed: {self.errors[0]!r}") from self.errors[0]

    def _produce(self) -> None:
        try:
            enqueue = self.make_enqueue()
        except BaseException as exc:  # raised by __init__, in the caller's thread
            self.errors.append(exc)
            self._ready.abort()
            return
        try:
            self._ready.wait()
        except threading.BrokenBarrierError:
            return  # another thread could not start: the run is over before it began
        while (call := self.due_calls.get()) is not None:
            i, due = call
            with self._stamp_lock:
                self.sent.stamp(i, due)
            try:
                enqueue(i)
            except BaseException as exc:  # reported by finish(), after the other calls
                self.errors.append(exc)

    def finish(self) -> Sent:
        """Let the calls still queued go out, stop the threads; raise if a call failed."""
        for _ in self._threads:
            self.due_calls.put(None)
        for thread in self._threads:
            thread.join(timeout=POST_LOAD_WAIT)
        if self.errors:
            raise RuntimeError(f"an enqueue failed: {self.errors[0]!r}") from self.errors[0]
        return self.sent


async def paced_async(
    rate: float,
    seconds: float,
    enqueue: Callable[[int], Awaitable[object]],
    in_flight: int = W2_IN_FLIGHT,
) -> Sent:
    """The asyncio twin of :func:`paced`: each call its own task, at most ``in_flight`` open.

    ``enqueue`` must allow concurrent calls (a pool, not one connection).
    """
    import asyncio  # noqa: PLC0415 - only the asyncio adapters need it

    sent = Sent()
    slots = asyncio.Semaphore(in_flight)
    calls: list[asyncio.Task[None]] = []

    async def call(i: int) -> None:
        try:
            await enqueue(i)
        finally:
            slots.release()

    for i, due in _schedule(rate, seconds):
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        sent.stamp(i, due)
        calls.append(asyncio.create_task(call(i)))
    await asyncio.gather(*calls)
    return sent


def sequential(seconds: float, enqueue: Callable[[int], object]) -> dict[str, Any]:
    """Single enqueues, one after another, for ``seconds``."""
    count = 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        enqueue(count)
        count += 1
    return throughput(count, time.monotonic() - t0)


async def sequential_async(
    seconds: float, enqueue: Callable[[int], Awaitable[object]]
) -> dict[str, Any]:
    """The asyncio twin of :func:`sequential`."""
    count = 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        await enqueue(count)
        count += 1
    return throughput(count, time.monotonic() - t0)


def threaded(
    seconds: float,
    make_enqueue: Callable[[], Callable[[int], object]],
    producers: int = CONCURRENT_PRODUCERS,
) -> dict[str, Any]:
    """``producers`` threads doing single enqueues for ``seconds``.

    ``make_enqueue`` is called once per thread (inside it) to build that thread's enqueue
    function, so each producer may hold its own client or connection.
    """
    counts = [0] * producers
    errors: list[BaseException] = []
    ready = threading.Barrier(producers + 1)
    stop = threading.Event()

    def produce(slot: int) -> None:
        try:
            enqueue = make_enqueue()
        except BaseException as exc:
            errors.append(exc)
            ready.abort()
            raise
        ready.wait()
        base = slot * 1_000_000_000
        try:
            while not stop.is_set():
                enqueue(base + counts[slot])
                counts[slot] += 1
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=produce, args=(i,), daemon=True) for i in range(producers)]
    for thread in threads:
        thread.start()
    ready.wait()
    t0 = time.monotonic()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    elapsed = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"a producer failed: {errors[0]!r}") from errors[0]
    return throughput(sum(counts), elapsed)


async def concurrent_async(
    seconds: float,
    enqueue: Callable[[int], Awaitable[object]],
    producers: int = CONCURRENT_PRODUCERS,
) -> dict[str, Any]:
    """``producers`` asyncio tasks doing single enqueues for ``seconds``."""
    import asyncio  # noqa: PLC0415 - only the asyncio adapters need it

    counts = [0] * producers
    stop = asyncio.Event()

    async def produce(slot: int) -> None:
        base = slot * 1_000_000_000
        while not stop.is_set():
            await enqueue(base + counts[slot])
            counts[slot] += 1

    t0 = time.monotonic()
    tasks = [asyncio.create_task(produce(i)) for i in range(producers)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return throughput(sum(counts), time.monotonic() - t0)


def bulk(
    seconds: float, batch_size: int, enqueue_batch: Callable[[list[int]], None]
) -> dict[str, Any]:
    """Bulk enqueues of ``batch_size`` tasks, one after another, for ``seconds``."""
    count = 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        enqueue_batch(list(range(count, count + batch_size)))
        count += batch_size
    result = throughput(count, time.monotonic() - t0)
    result["batch_size"] = batch_size
    return result


async def bulk_async(
    seconds: float, batch_size: int, enqueue_batch: Callable[[list[int]], Awaitable[object]]
) -> dict[str, Any]:
    """The asyncio twin of :func:`bulk`."""
    count = 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        await enqueue_batch(list(range(count, count + batch_size)))
        count += batch_size
    result = throughput(count, time.monotonic() - t0)
    result["batch_size"] = batch_size
    return result


# --- Worker processes --------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_live: list[Processes] = []  # for the watchdog


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the adapter dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for worker processes: benchmarks/ importable, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(BENCHMARKS_DIR), env.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class Processes:
    """Worker processes started by an adapter, each in its own process group.

    Used as a context manager: on exit every group gets SIGTERM, then SIGKILL after a grace
    period, so children the worker forked (Celery's pool, Dramatiq's processes) go too.
    """

    def __init__(self) -> None:
        """Start with no processes."""
        self.procs: list[subprocess.Popen[bytes]] = []
        _live.append(self)

    def start(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``cmd`` with its output on our stderr."""
        log("starting: " + " ".join(cmd))
        proc = subprocess.Popen(
            cmd,
            env=env if env is not None else worker_env(),
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),
            stderr=sys.stderr.fileno(),
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only ctypes prctl, no locks taken
        )
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        """Raise if a worker exited."""
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"worker {proc.args!r} exited with status {proc.returncode}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every group, wait up to ``grace`` seconds, then SIGKILL what is left."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            # The group may outlive its leader (forked pool children): kill it in any case.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.procs.clear()
        with contextlib.suppress(ValueError):
            _live.remove(self)

    def __enter__(self) -> Self:
        """Return self."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop every process, even on error or timeout."""
        # A hard timeout arriving during cleanup must not cut it short.
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.stop()


def self_command(script: str, args: argparse.Namespace, *extra: str) -> list[str]:
    """The command that re-runs an adapter script as a worker."""
    return [
        sys.executable,
        script,
        "--role",
        "worker",
        "--pg-url",
        args.pg_url,
        "--redis-url",
        args.redis_url,
        # Past the adapter's own limit, which stops the workers first; this is the backstop.
        "--timeout",
        str(args.timeout + 60),
        *extra,
    ]


def run_sync_workload(
    args: argparse.Namespace,
    enqueue: Callable[[int], object],
    start_workers: Callable[[Processes], None],
    *,
    no_bulk_reason: str,
    make_enqueue: Callable[[], Callable[[int], object]] | None = None,
) -> dict[str, Any]:
    """Every workload for a system with a blocking, thread-safe single enqueue and no bulk API.

    w1 pre-queues with single enqueues (there is no bulk call), then starts the workers.
    ``make_enqueue`` builds one producer's enqueue function for w2's and w3-concurrent's
    producer threads (default: share ``enqueue``).
    """
    workload = args.workload
    if workload == "w1":
        with timing_file() as path, Processes() as procs:
            for i in range(args.tasks):
                enqueue(i)
            log(f"enqueued {args.tasks}; starting workers")
            start_workers(procs)
            wait_for_tasks(path, args.tasks, args.timeout, procs.check_alive)
            return w1_result(path, args.tasks)
    if workload == "w2":
        with timing_file() as path, Processes() as procs:
            start_workers(procs)
            for i in range(-WARM_UP_TASKS, 0):
                enqueue(i)
            ready = wait_for_tasks(path, WARM_UP_TASKS, WARM_UP_TIMEOUT, procs.check_alive)
            if ready < WARM_UP_TASKS:
                raise RuntimeError("workers did not start")
            time.sleep(WARM_UP_SETTLE)
            sent = paced(args.rate, args.seconds, make_enqueue or (lambda: enqueue))
            expected = len(sent.enqueued_at) + WARM_UP_TASKS
            wait_for_tasks(path, expected, POST_LOAD_WAIT, procs.check_alive)
            return w2_result(path, sent)
    if workload == "w3-single":
        return sequential(args.seconds, enqueue)
    if workload == "w3-concurrent":
        return threaded(args.seconds, make_enqueue or (lambda: enqueue))
    if workload == "w3-bulk":
        return unsupported(no_bulk_reason)
    raise ValueError(workload)


def flush_redis(url: str) -> None:
    """Empty the Redis database the run uses."""
    import redis  # noqa: PLC0415 - only the Redis adapters need it

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
