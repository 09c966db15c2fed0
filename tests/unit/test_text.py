"""conveyor.text: the one time format every view prints, and the UTF-8 check."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from conveyor.text import not_utf8, utc_time


def test_a_time_is_shown_in_utc_whatever_its_zone() -> None:
    tokyo = timezone(timedelta(hours=9))
    moment = datetime(2026, 12, 5, 17, 22, 20, 68_422, tokyo)
    assert utc_time(moment) == "2026-12-05 08:22:20 UTC"
    assert utc_time(moment, precise=True) == "2026-12-05 08:22:20.068 UTC"
    # Milliseconds are cut, not rounded up into the next second.
    assert utc_time(datetime(2026, 1, 1, 0, 0, 0, 999_999, UTC), precise=True) == (
        "2026-01-01 00:00:00.999 UTC"
    )


def test_not_utf8_names_the_first_part_that_is_not_a_character() -> None:
    assert not_utf8("send_email") is None
    assert not_utf8("größe ✓") is None
    # What Python makes of the bytes b"a\xffb" in an argument (surrogateescape).
    assert not_utf8(b"a\xffb".decode(errors="surrogateescape")) == "\udcff"
