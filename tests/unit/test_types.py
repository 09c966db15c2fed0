"""Task validation and ids: the rules every producer hits before the network."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from conveyor import Task, TaskState
from conveyor import types as types_module
from conveyor.errors import InvalidTask
from conveyor.types import DEFAULT_TIMEOUT, new_task_id, normalize_task_id


class TestTaskValidation:
    def test_defaults_match_the_documented_contract(self) -> None:
        """A Task has an empty payload, a 5 minute timeout and 3 retries by default."""
        task = Task(type="send_email")
        assert task.payload == b""
        assert task.timeout == timedelta(minutes=5)
        assert task.max_retries == 3
        assert task.id is None

    @pytest.mark.parametrize("name", ["a", "send_email", "x.y:z-1", "A" * 128])
    def test_valid_type_names_are_accepted(self, name: str) -> None:
        """Types of 1-128 characters from [A-Za-z0-9_.:-] are valid."""
        assert Task(type=name).type == name

    @pytest.mark.parametrize(
        ("name", "fragment"),
        [
            ("", "must not be empty"),
            ("A" * 129, "limit is 128"),
            ("has space", "may only contain"),
            ("semi;colon", "may only contain"),
            ("ünicode", "may only contain"),
            ("quote'; DROP TABLE x;--", "may only contain"),
        ],
    )
    def test_invalid_type_names_are_rejected_with_the_reason(
        self, name: str, fragment: str
    ) -> None:
        """Each bad type name raises InvalidTask saying what is wrong."""
        with pytest.raises(InvalidTask, match=fragment) as raised:
            Task(type=name)
        assert raised.value.field == "type"

    def test_timeout_in_seconds_is_converted_to_a_timedelta(self) -> None:
        """`timeout=2.5` means 2.5 seconds."""
        assert Task(type="t", timeout=2.5).timeout == timedelta(seconds=2.5)

    @pytest.mark.parametrize("timeout", [0, -1, timedelta(seconds=-3), timedelta(days=8)])
    def test_out_of_range_timeouts_are_rejected(self, timeout: object) -> None:
        """Zero, negative and absurdly long timeouts raise InvalidTask."""
        with pytest.raises(InvalidTask) as raised:
            Task(type="t", timeout=timeout)  # type: ignore[arg-type]
        assert raised.value.field == "timeout"

    @pytest.mark.parametrize(
        ("timeout", "message"),
        [
            pytest.param(float("nan"), "must be a finite number of seconds, got nan", id="nan"),
            pytest.param(float("inf"), "must be a finite number of seconds, got inf", id="inf"),
            pytest.param(float("-inf"), "must be a finite number of seconds, got -inf", id="-inf"),
            pytest.param(1e20, "may be at most 7 days (604800 s), got 1e+20 s", id="1e20"),
            pytest.param(
                10**400, "may be at most 7 days (604800 s), got 1.00e+400 s", id="10**400"
            ),
            pytest.param(-1e20, "must be positive, got -1e+20 s", id="-1e20"),
            pytest.param(700000, "may be at most 7 days (604800 s), got 700000 s", id="700000"),
            pytest.param(
                timedelta(days=8), "may be at most 7 days (604800 s), got 8 days", id="8d"
            ),
            pytest.param(1e-7, "must be at least a microsecond, got 1e-07 s", id="1e-7"),
            pytest.param("30", "must be a timedelta or a number of seconds, not str", id="str"),
        ],
    )
    def test_timeouts_no_timedelta_can_hold_are_invalid_tasks(
        self, timeout: object, message: str
    ) -> None:
        """nan, infinities and huge numbers raise InvalidTask, not ValueError/OverflowError.

        `timedelta(seconds=...)` raises ValueError for nan and OverflowError past 999999999
        days; the limit reads "7 days", not timedelta's "7 days, 0:00:00".
        """
        with pytest.raises(InvalidTask) as raised:
            Task(type="t", timeout=timeout)  # type: ignore[arg-type]
        assert raised.value.message == f"timeout {message}"
        assert raised.value.field == "timeout"

    @pytest.mark.parametrize("value", [-1, 1001, 1.5, True, "3"])
    def test_bad_max_retries_is_rejected(self, value: object) -> None:
        """max_retries must be an int between 0 and 1000."""
        with pytest.raises(InvalidTask):
            Task(type="t", max_retries=value)  # type: ignore[arg-type]

    def test_payload_must_be_bytes(self) -> None:
        """A str payload is a mistake worth catching: encoding is the caller's choice."""
        with pytest.raises(InvalidTask, match="bytes"):
            Task(type="t", payload="text")  # type: ignore[arg-type]

    def test_bytearray_payload_is_frozen_to_bytes(self) -> None:
        """Mutable buffers are copied so the task cannot change after validation."""
        buffer = bytearray(b"abc")
        task = Task(type="t", payload=buffer)
        buffer[0] = ord("z")
        assert task.payload == b"abc"

    def test_types_seen_before_still_leave_bad_ones_refused(self) -> None:
        """The cache of valid types speeds up repeats without letting a bad type through,
        and it stays bounded however many types a program makes up."""
        for index in range(3000):
            Task(type=f"made.up.{index}")
        assert 0 < len(types_module._KNOWN_TYPES) <= types_module._KNOWN_TYPES_LIMIT
        with pytest.raises(InvalidTask, match="may only contain"):
            Task(type="made up")
        with pytest.raises(InvalidTask, match="string"):
            Task(type=["made.up.1"])  # type: ignore[arg-type]

    def test_the_default_timeout_and_a_given_one_are_both_checked_values(self) -> None:
        """The default timeout is taken as it is; any other still goes through validation."""
        assert Task(type="t").timeout is DEFAULT_TIMEOUT
        assert Task(type="t", timeout=timedelta(minutes=5)).timeout == DEFAULT_TIMEOUT
        with pytest.raises(InvalidTask):
            Task(type="t", timeout=timedelta(0))

    def test_explicit_id_is_normalised(self) -> None:
        """An upper-case UUID is stored in canonical form."""
        value = str(uuid.uuid4())
        assert Task(type="t", id=value.upper()).id == value

    def test_malformed_id_is_rejected(self) -> None:
        """Ids must be UUIDs; the message shows the bad value."""
        with pytest.raises(InvalidTask, match="not-a-uuid"):
            Task(type="t", id="not-a-uuid")


class TestTaskIds:
    def test_generated_ids_are_uuid_version_7(self) -> None:
        """New ids are RFC 9562 UUIDv7: version 7, RFC 4122 variant."""
        parsed = uuid.UUID(new_task_id())
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122

    def test_generated_ids_are_unique_and_time_ordered(self) -> None:
        """Ids made later sort later at millisecond resolution, and never repeat."""
        ids = [new_task_id() for _ in range(2000)]
        assert len(set(ids)) == len(ids)
        prefixes = [uuid.UUID(i).int >> 80 for i in ids]  # the 48-bit millisecond timestamp
        assert prefixes == sorted(prefixes)

    def test_normalize_rejects_non_strings(self) -> None:
        """A non-string id is a type error reported as InvalidTask."""
        with pytest.raises(InvalidTask):
            normalize_task_id(123)  # type: ignore[arg-type]


class TestTaskState:
    def test_only_succeeded_failed_and_cancelled_are_final(self) -> None:
        """is_final separates live states from final ones."""
        assert {state for state in TaskState if state.is_final} == {
            TaskState.SUCCEEDED,
            TaskState.FAILED,
            TaskState.CANCELLED,
        }


class TestPrintable:
    """Worker ids, hosts and versions: free text that must not hold control characters."""

    @pytest.mark.parametrize(
        ("text", "position"),
        [
            ("web-1-4242-a1b2c3", None),
            ("hôte 工場 ✓ [b]", None),
            ("tab\there", 3),
            ("line\nforged", 4),
            ("\x1b[2J", 0),
            ("abc\u202e", 3),  # a bidi override
            ("a\u2029b", 1),  # the paragraph separator
            ("a\u00a0b", None),  # a no-break space is printable, if not isprintable()
        ],
    )
    def test_first_unprintable(self, text: str, position: int | None) -> None:
        assert types_module.first_unprintable(text) == position

    def test_printable_replaces_each_bad_character(self) -> None:
        assert types_module.printable("box\x1b[2J\u202e\u00a0x") == "box?[2J?\u00a0x"
        text = "already fine"
        assert types_module.printable(text) is text

    def test_a_worker_id_names_the_field_and_the_character(self) -> None:
        with pytest.raises(InvalidTask, match=r"worker_id must not .* U\+000A at position 1"):
            types_module.validate_worker_id("w\nx")
        with pytest.raises(InvalidTask, match="1 to 200 characters") as refused:
            types_module.validate_worker_id("w" * 201)
        assert refused.value.field == "worker_id"
        assert types_module.validate_worker_id("w" * 200) == "w" * 200
