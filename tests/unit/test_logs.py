"""conveyor.logs: the JSON and text formats, the task context and its filter, and setup.

Records go through real loggers and real stream handlers into a StringIO, exactly as they
would reach stderr.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import threading
import uuid
import warnings
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta

import pytest

from conveyor import TaskContext
from conveyor.logs import (
    ContextAdapter,
    ContextFilter,
    bind_task_fields,
    configure_logging,
    context_fields,
    log_context,
    make_handler,
)

TASK = {
    "worker_id": "host-1-abc",
    "task_id": "0190d6c4-0000-7000-8000-000000000001",
    "task_type": "send_email",
    "attempt": 2,
    "lease_id": "0190d6c4-0000-7000-8000-0000000000aa",
}


def fail(error: Exception) -> None:
    raise error


class Captured:
    """A private logger whose records are formatted into a string buffer."""

    def __init__(self, fmt: str) -> None:
        self.stream = io.StringIO()
        self.logger = logging.getLogger(f"test_logs.{uuid.uuid4().hex[:8]}")
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)
        self.handler = make_handler(fmt, self.stream)  # type: ignore[arg-type]
        self.logger.addHandler(self.handler)

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def documents(self) -> list[dict]:
        return [json.loads(line) for line in self.lines()]

    def close(self) -> None:
        self.logger.removeHandler(self.handler)


@pytest.fixture
def as_json() -> Iterator[Captured]:
    captured = Captured("json")
    yield captured
    captured.close()


@pytest.fixture
def as_text() -> Iterator[Captured]:
    captured = Captured("text")
    yield captured
    captured.close()


class TestJsonFormatter:
    def test_one_object_per_line_with_the_base_fields(self, as_json: Captured) -> None:
        before = datetime.now(UTC)
        as_json.logger.warning("hello %s, %d times", "world", 3)
        [line] = as_json.lines()
        document = json.loads(line)
        assert {key: document[key] for key in ("level", "logger", "message")} == {
            "level": "warning",
            "logger": as_json.logger.name,
            "message": "hello world, 3 times",
        }
        assert document["ts"].endswith("Z")
        ts = datetime.fromisoformat(document["ts"])
        assert ts.utcoffset() == timedelta(0)
        # Millisecond precision: within a millisecond below `before`, and not in the future.
        assert before - timedelta(milliseconds=1) <= ts <= datetime.now(UTC)
        assert set(document) == {"ts", "level", "logger", "message"}

    def test_extra_fields_are_top_level_keys(self, as_json: Captured) -> None:
        as_json.logger.info(
            "leased", extra={"event": "task_leased", "count": 3, "ratio": 0.5, "flag": True}
        )
        [document] = as_json.documents()
        assert document["event"] == "task_leased"
        assert (document["count"], document["ratio"], document["flag"]) == (3, 0.5, True)

    def test_context_fields_come_first_in_a_fixed_order(self, as_json: Captured) -> None:
        with log_context(lease_id="l", attempt=1, task_type="t", task_id="i", worker_id="w"):
            as_json.logger.info("x", extra={"event": "e"})
        [line] = as_json.lines()
        assert list(json.loads(line)) == [
            *("ts", "level", "logger", "message"),
            *("worker_id", "task_id", "task_type", "attempt", "lease_id"),
            "event",
        ]

    def test_values_json_cannot_hold_are_written_as_text(self, as_json: Captured) -> None:
        when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
        as_json.logger.info("x", extra={"when": when, "tags": {"a"}})
        [document] = as_json.documents()
        assert document["when"] == str(when)
        assert document["tags"] == "{'a'}"

    def test_an_extra_cannot_hide_a_base_field(self, as_json: Captured) -> None:
        as_json.logger.error("real message", extra={"level": "debug", "logger": "fake"})
        [document] = as_json.documents()
        assert (document["level"], document["logger"]) == ("error", as_json.logger.name)

    def test_exception_text_is_included_and_the_line_stays_one_line(
        self, as_json: Captured
    ) -> None:
        try:
            fail(ValueError("bad input\non two lines"))
        except ValueError:
            as_json.logger.exception("handler\nfailed", extra={"event": "boom"})
        [line] = as_json.lines()
        document = json.loads(line)
        assert document["message"] == "handler\nfailed"
        assert document["exception"].startswith("Traceback (most recent call last):")
        assert document["exception"].endswith("ValueError: bad input\non two lines")
        assert document["event"] == "boom"

    def test_unicode_line_separators_are_escaped(self, as_json: Captured) -> None:
        """json.dumps writes U+2028, U+2029 and U+0085 raw (non-ASCII is kept as is); a
        shipper splitting on Unicode line boundaries split the line there."""
        as_json.logger.info("a\u2028b\u2029c\x85d é")
        raw = as_json.stream.getvalue()
        assert len(raw.splitlines()) == 1
        assert "\\u2028" in raw
        assert "é" in raw
        [document] = as_json.documents()
        assert document["message"] == "a\u2028b\u2029c\x85d é"

    def test_no_exception_key_without_an_exception(self, as_json: Captured) -> None:
        as_json.logger.info("fine")
        [document] = as_json.documents()
        assert "exception" not in document
        assert "stack" not in document

    def test_stack_info_is_included(self, as_json: Captured) -> None:
        as_json.logger.info("where am I", stack_info=True)
        [document] = as_json.documents()
        assert document["stack"].startswith("Stack (most recent call last):")
        assert "test_stack_info_is_included" in document["stack"]


class TestTextFormatter:
    def test_plain_line_without_a_task(self, as_text: Captured) -> None:
        as_text.logger.info("registered", extra={"event": "worker_registered"})
        [line] = as_text.lines()
        assert line.endswith(f" INFO    {as_text.logger.name}: registered")
        assert "task=" not in line

    def test_task_fields_are_appended(self, as_text: Captured) -> None:
        with log_context(**TASK):
            as_text.logger.warning("timed out")
        [line] = as_text.lines()
        assert line.endswith(
            f"{as_text.logger.name}: timed out task={TASK['task_id']} type=send_email attempt=2"
        )

    def test_traceback_comes_after_the_task_fields(self, as_text: Captured) -> None:
        with log_context(**TASK):
            try:
                fail(RuntimeError("kaput"))
            except RuntimeError:
                as_text.logger.exception("failed")
        lines = as_text.lines()
        assert lines[0].endswith(f"failed task={TASK['task_id']} type=send_email attempt=2")
        assert lines[1] == "Traceback (most recent call last):"
        assert lines[-1] == "RuntimeError: kaput"

    def test_a_message_cannot_forge_a_line(self, as_text: Captured) -> None:
        """A newline or CR in a message (a worker id, an error) became a line of its own
        that looked like any other: now every control and format character is an escape."""
        forged = "w1\n2025-01-15 10:04:05,123 INFO    conveyor.server.control: type billing resumed"
        as_text.logger.info("worker %s stopped", forged)
        as_text.logger.info("a\rb\x1b[2Jc\u202ed\u2028e\x85f\tg")
        first, second = as_text.lines()
        assert first.endswith(f"worker {forged.replace(chr(10), chr(92) + 'n')} stopped")
        assert second.endswith("a\\rb\\x1b[2Jc\\u202ed\\u2028e\\x85f\tg")

    def test_escaping_leaves_the_record_alone(self, as_text: Captured) -> None:
        """Other handlers of the same record (JSON, a test's caplog) see the message as
        logged."""
        seen = []
        spy = logging.Handler()
        spy.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
        as_text.logger.addHandler(spy)
        try:
            as_text.logger.info("x\ny")
        finally:
            as_text.logger.removeHandler(spy)
        assert as_text.lines()[0].endswith("x\\ny")
        assert seen == ["x\ny"]


class TestContext:
    def test_filter_adds_every_bound_field(self, as_json: Captured) -> None:
        with log_context(**TASK):
            as_json.logger.info("inside")
        as_json.logger.info("outside")
        inside, outside = as_json.documents()
        assert {key: inside[key] for key in TASK} == TASK
        assert not set(TASK) & set(outside)

    def test_nested_blocks_add_to_and_restore_the_outer_fields(self, as_json: Captured) -> None:
        with log_context(worker_id="w1"):
            with log_context(task_id="t1", task_type="a", attempt=1, lease_id="l1"):
                with log_context(attempt=2):
                    as_json.logger.info("innermost")
                as_json.logger.info("task")
            as_json.logger.info("worker")
        innermost, task, worker = as_json.documents()
        assert (innermost["worker_id"], innermost["task_id"], innermost["attempt"]) == (
            "w1",
            "t1",
            2,
        )
        assert task["attempt"] == 1
        assert worker["worker_id"] == "w1"
        assert "task_id" not in worker
        assert context_fields() == {}

    def test_an_explicit_extra_wins_over_the_context(self, as_json: Captured) -> None:
        with log_context(**TASK):
            as_json.logger.info("other task", extra={"task_id": "explicit"})
        [document] = as_json.documents()
        assert document["task_id"] == "explicit"
        assert document["task_type"] == "send_email"

    def test_fields_reach_a_thread_only_through_a_copied_context(self, as_json: Captured) -> None:
        """The worker runs sync handlers with copy_context().run; a bare thread sees nothing."""

        def log(message: str) -> None:
            as_json.logger.info(message)

        with log_context(**TASK):
            copied = contextvars.copy_context()
            threads = [
                threading.Thread(target=copied.run, args=(log, "copied")),
                threading.Thread(target=log, args=("bare",)),
            ]
        for thread in threads:
            thread.start()
            thread.join()
        by_message = {document["message"]: document for document in as_json.documents()}
        assert by_message["copied"]["task_id"] == TASK["task_id"]
        assert "task_id" not in by_message["bare"]

    def test_asyncio_tasks_inherit_the_fields_of_their_creator(self, as_json: Captured) -> None:
        async def child() -> None:
            as_json.logger.info("child")

        async def main() -> None:
            with log_context(**TASK):
                spawned = asyncio.create_task(child())
            # The block has ended; the task keeps the fields it was created with.
            await spawned
            as_json.logger.info("parent after")

        asyncio.run(main())
        by_message = {document["message"]: document for document in as_json.documents()}
        assert by_message["child"]["attempt"] == 2
        assert "attempt" not in by_message["parent after"]

    def test_filter_never_drops_a_record(self) -> None:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
        assert ContextFilter().filter(record) is True
        assert not hasattr(record, "task_id")


class TestContextAdapter:
    def test_keeps_the_call_extra_the_adapter_extra_and_the_context(self) -> None:
        """Python 3.11's LoggerAdapter drops the call's extra; this one merges all three."""
        captured = Captured("json")
        try:
            # No ContextFilter on this handler: the adapter alone must carry the context.
            captured.handler.filters.clear()
            adapter = ContextAdapter(captured.logger, {"task_type": "adapter", "attempt": 7})
            with log_context(worker_id="w9", task_type="context"):
                adapter.info("x", extra={"event": "call", "attempt": 8})
            [document] = captured.documents()
        finally:
            captured.close()
        assert document["event"] == "call"
        assert document["attempt"] == 8  # the call wins over the adapter
        assert document["task_type"] == "adapter"  # the adapter wins over the context
        assert document["worker_id"] == "w9"

    def test_plain_logger_adapter_would_lose_the_event(self) -> None:
        """Why ContextAdapter exists: the stdlib adapter replaces a call's extra."""
        captured = Captured("json")
        try:
            logging.LoggerAdapter(captured.logger, {"task_id": "t"}).info(
                "x", extra={"event": "lost"}
            )
            [document] = captured.documents()
        finally:
            captured.close()
        assert "event" not in document


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(capture=False)


class TestConfigureLogging:
    def test_json_to_the_given_stream_at_the_given_level(self, restore_root_logging) -> None:
        stream = io.StringIO()
        configure_logging("warning", "json", stream)
        logger = logging.getLogger("test_logs.configured")
        logger.info("too quiet")
        with log_context(**TASK):
            logger.warning("loud", extra={"event": "e"})
        [document] = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert (document["message"], document["event"], document["task_id"]) == (
            "loud",
            "e",
            TASK["task_id"],
        )

    def test_calling_again_replaces_only_its_own_handler(self, restore_root_logging) -> None:
        root = logging.getLogger()
        others = [handler for handler in root.handlers if handler.get_name() != "conveyor"]
        first, second = io.StringIO(), io.StringIO()
        configure_logging("info", "json", first)
        configure_logging("info", "text", second)
        ours = [handler for handler in root.handlers if handler.get_name() == "conveyor"]
        assert len(ours) == 1
        assert [handler for handler in root.handlers if handler not in ours] == others
        logging.getLogger("test_logs.again").info("once")
        assert first.getvalue() == ""
        assert second.getvalue().rstrip().endswith("test_logs.again: once")

    def test_warnings_become_records(self, restore_root_logging) -> None:
        stream = io.StringIO()
        configure_logging("info", "json", stream)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
        [document] = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert document["logger"] == "py.warnings"
        assert "DeprecationWarning: deprecated thing" in document["message"]

    def test_unknown_format_is_refused(self) -> None:
        with pytest.raises(ValueError, match="unknown log format 'xml'"):
            make_handler("xml")  # type: ignore[arg-type]


class TestTaskContextLaziness:
    """The context builds its `cancelled` event and `logger` on first use, once."""

    def make(self) -> TaskContext:
        return TaskContext(
            task_id="t-1",
            task_type="mail.send",
            attempt=2,
            max_retries=3,
            lease_id="l-1",
            deadline=datetime.now(UTC),
            worker_id="w-1",
        )

    def test_cancelled_is_one_event_whichever_thread_asks_first(self) -> None:
        ctx = self.make()
        seen: list[threading.Event] = []
        barrier = threading.Barrier(8)

        def ask() -> None:
            barrier.wait()
            seen.append(ctx.cancelled)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len({id(event) for event in seen}) == 1
        ctx.cancelled.set()
        assert all(event.is_set() for event in seen)

    def test_logger_carries_the_attempt_fields(self, caplog: pytest.LogCaptureFixture) -> None:
        ctx = self.make()
        assert ctx.logger is ctx.logger
        with caplog.at_level(logging.INFO, logger="conveyor.task.mail.send"):
            ctx.logger.info("hello", extra={"event": "custom"})
        (record,) = caplog.records
        assert record.name == "conveyor.task.mail.send"
        fields = {k: getattr(record, k) for k in ("task_id", "attempt", "lease_id", "worker_id")}
        assert fields == {"task_id": "t-1", "attempt": 2, "lease_id": "l-1", "worker_id": "w-1"}
        assert record.event == "custom"  # type: ignore[attr-defined]

    def test_bound_task_fields_stay_in_their_asyncio_task(self) -> None:
        async def attempt() -> Mapping[str, object]:
            bind_task_fields(task_id="t-9", task_type="x", attempt=1, lease_id="l-9")
            return dict(context_fields())

        async def main() -> tuple[Mapping[str, object], Mapping[str, object]]:
            with log_context(worker_id="w-1"):
                inside = await asyncio.create_task(attempt())
                return inside, dict(context_fields())

        inside, after = asyncio.run(main())
        assert inside == {
            "worker_id": "w-1",
            "task_id": "t-9",
            "task_type": "x",
            "attempt": 1,
            "lease_id": "l-9",
        }
        assert after == {"worker_id": "w-1"}
