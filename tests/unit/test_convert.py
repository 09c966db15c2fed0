"""The protocol's time conversions agree with protobuf's own, on every kind of value."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.protocol import convert

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Edges by hand (zero, sub-second, negative, a microsecond either side of the epoch, the
# ends of datetime's range), then random values across the whole range.
EDGE_MICROS = [0, 1, -1, 999_999, -999_999, 1_000_000, -1_000_001, 300_000_000, -86_400_000_001]
RANDOM_MICROS = [random.Random(seed).randint(-(10**16), 10**16) for seed in range(2_000)]


@pytest.mark.parametrize("micros", EDGE_MICROS + RANDOM_MICROS[:200])
def test_duration_matches_protobuf(micros: int) -> None:
    value = timedelta(microseconds=micros)
    expected = Duration()
    expected.FromTimedelta(value)
    assert convert.duration(value) == expected
    assert convert.seconds(convert.duration(value)) == pytest.approx(value.total_seconds())


def test_timestamps_match_protobuf_both_ways() -> None:
    values = [EPOCH + timedelta(microseconds=m) for m in EDGE_MICROS + RANDOM_MICROS]
    values += [datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999_999, UTC)]
    for value in values:
        expected = Timestamp()
        expected.FromDatetime(value)
        assert convert.timestamp(value) == expected, value
        # A naive datetime means UTC, as protobuf's FromDatetime takes it.
        assert convert.timestamp(value.replace(tzinfo=None)) == expected, value
        assert convert.from_timestamp(expected) == expected.ToDatetime(tzinfo=UTC) == value


def test_timestamp_of_another_zone_is_the_same_instant() -> None:
    value = datetime(2026, 11, 30, 12, 0, 0, 123_456, UTC)
    elsewhere = value.astimezone(datetime.now().astimezone().tzinfo)
    assert convert.timestamp(elsewhere) == convert.timestamp(value)
    assert convert.timestamp(None) is None
