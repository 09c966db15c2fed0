"""Ctrl-C in a thread that leads a joined enqueue leaves the other threads' enqueues whole.

The blocking `Client` joins the enqueues of threads that wait together into one request
(`BlockingGroupCommit`), written by one of them, the leader. When the leader is
interrupted (KeyboardInterrupt) with that request on the wire, the server may still commit
it. The other threads' calls used to be failed with `ServerUnavailable`, for tasks that
existed, and the retry that error invites created them a second time under new ids; the
next leader now sends them again, the same tasks, which the server creates once.

The order of the threads is set by holding the group commit's first writes at a gate;
every write still goes to the real server and PostgreSQL.
"""

from __future__ import annotations

import itertools
import signal
import threading
import uuid
from typing import Any

import pytest
from helpers import wait_for, writes_blocked

from conveyor import Client, Task

HELD_WRITES = 3


class GatedWrites:
    """The client's first `HELD_WRITES` writes wait at a gate each; later ones go at once."""

    def __init__(self, client: Client) -> None:
        self.commit = client._enqueues
        self._write = self.commit._write
        self.entered = [threading.Event() for _ in range(HELD_WRITES)]
        self.release = [threading.Event() for _ in range(HELD_WRITES)]
        self.batches: list[Any] = []
        self._numbers = itertools.count()
        self.commit._write = self.write  # type: ignore[method-assign]

    def write(self, batch: Any) -> Any:
        number = next(self._numbers)
        if number < HELD_WRITES:
            self.batches.append(batch)
            self.entered[number].set()
            self.release[number].wait(30)
        return self._write(batch)

    def open_all(self) -> None:
        for gate in self.release:
            gate.set()


def enqueue_in_thread(client: Client, outcomes: dict[str, object], task: Task) -> threading.Thread:
    """A thread enqueueing `task`, its id or its exception recorded under its type."""

    def enqueue() -> None:
        try:
            outcomes[task.type] = client.enqueue_task(task)
        except BaseException as exc:  # recorded for the asserts, KeyboardInterrupt too
            outcomes[task.type] = exc

    return threading.Thread(target=enqueue, daemon=True)


def test_an_interrupted_leader_does_not_fail_another_threads_enqueue(server: Any, db: Any) -> None:
    assert threading.current_thread() is threading.main_thread()  # where SIGINT lands
    client = Client(server.address)
    client.enqueue_task(Task(type="enqueue.warm"))  # the stream is open
    writes = GatedWrites(client)
    outcomes: dict[str, object] = {}
    # Two threads take both slots; their writes wait at their gates.
    first, second = (
        enqueue_in_thread(client, outcomes, Task(type=f"enqueue.{name}"))
        for name in ("first", "second")
    )
    first.start()
    wait_for(writes.entered[0].is_set, what="the first thread writing")
    second.start()
    wait_for(writes.entered[1].is_set, what="the second thread writing")
    other_id = str(uuid.uuid4())
    other = enqueue_in_thread(client, outcomes, Task(type="enqueue.other", id=other_id))
    interrupted = threading.Event()
    driver_errors: list[BaseException] = []

    def drive() -> None:
        try:
            # The main thread's call waits first, then the other thread's.
            wait_for(lambda: len(writes.commit._waiting) == 1, what="the main thread waiting")
            other.start()
            wait_for(lambda: len(writes.commit._waiting) == 2, what="the other thread waiting")
            # The first write ends: its slot goes to the oldest waiting call, the main
            # thread's, which leads one request carrying both waiting calls.
            writes.release[0].set()
            wait_for(writes.entered[2].is_set, what="the main thread leading the joined request")
            with writes_blocked(db.url):
                writes.release[2].set()
                wait_for(
                    lambda: db.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted "
                        "AND relation = 'conveyor_tasks'::regclass"
                    ),
                    what="the joined insert waiting in PostgreSQL",
                )
                main = threading.main_thread().ident
                assert main is not None
                signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C in the main thread
                wait_for(interrupted.is_set, what="the main thread interrupted")
            # The joined insert commits now, and the other thread's call goes again.
            other.join(30)
        except BaseException as exc:  # recorded for the asserts
            driver_errors.append(exc)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    driver = threading.Thread(target=drive, daemon=True)
    try:
        driver.start()
        with pytest.raises(KeyboardInterrupt):
            client.enqueue_task(Task(type="enqueue.main"))
        interrupted.set()
        driver.join(30)
    finally:
        signal.signal(signal.SIGINT, previous)
        writes.open_all()
        for thread in (first, second, other):
            thread.join(30)
        client.close()

    assert not driver_errors, driver_errors
    assert len(writes.batches[2].tasks) == 2  # the interrupted request carried both calls
    # The other thread, which nobody interrupted, gets its id; its task exists once.
    assert outcomes["enqueue.other"] == other_id, (
        f"the other thread's enqueue raised {outcomes['enqueue.other']!r} although nothing "
        "interrupted it"
    )
    assert db.fetchval("SELECT count(*) FROM conveyor_tasks WHERE type = 'enqueue.other'") == 1
