"""The workers listing's page tokens: what the server hands out it reads back exactly, and
anything else is InvalidTask (INVALID_ARGUMENT), never another error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.errors import InvalidTask
from conveyor.server.worker_listing import parse_page_token, token_after
from conveyor.storage.queries import WorkerListPosition


@given(
    troubled=st.booleans(),
    started_at=st.datetimes(
        # hypothesis takes naive bounds and adds the zone itself.
        min_value=datetime(1970, 1, 1),  # noqa: DTZ001
        max_value=datetime(9999, 1, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    worker_id=st.text(min_size=1, max_size=200).filter(lambda text: "\x00" not in text),
)
def test_a_token_reads_back_as_the_row_it_was_made_from(
    troubled: bool, started_at: datetime, worker_id: str
) -> None:
    row = {"troubled": troubled, "started_at": started_at, "id": worker_id}
    token = token_after(row)
    assert token.isascii()
    assert " " not in token  # pastes into a shell
    assert parse_page_token(token) == WorkerListPosition(troubled, started_at, worker_id)


def test_microseconds_survive() -> None:
    started_at = datetime(2025, 1, 15, 10, 4, 5, 123_456, tzinfo=UTC)
    row = {"troubled": False, "started_at": started_at, "id": "w"}
    position = parse_page_token(token_after(row))
    assert position is not None
    assert position.started_at - started_at == timedelta(0)


def test_no_token_is_the_first_page() -> None:
    assert parse_page_token("") is None


@given(st.text(min_size=1, max_size=300))
def test_anything_else_is_invalid_or_a_position(token: str) -> None:
    try:
        parse_page_token(token)
    except InvalidTask as refused:
        field = refused.field
    else:
        field = "page_token"
    assert field == "page_token"


@pytest.mark.parametrize(
    "token",
    [
        "junk!",
        "MTox",  # "1:1": no id
        "Mjo1Onc",  # "2:5:w": no such flag
        "MTo5OTk5OTk5OTk5OTk5OTk5OTk5OTk5Onc",  # a time past datetime's range
        "MToxOncA",  # an id with NUL
        "x" * 5000,
    ],
)
def test_malformed_tokens_name_the_field(token: str) -> None:
    with pytest.raises(InvalidTask, match="malformed page token") as refused:
        parse_page_token(token)
    assert refused.value.field == "page_token"
