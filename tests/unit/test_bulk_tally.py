"""BulkTally: how a client strings together the short calls of one bulk action."""

from __future__ import annotations

from conveyor.client.core import BulkTally
from conveyor.protocol.v1 import conveyor_pb2 as pb
from conveyor.types import BulkResult


def by_filter(**fields) -> pb.BulkTaskRequest:
    return pb.BulkTaskRequest(filter=pb.TaskFilter(type="t"), **fields)


class TestBulkTally:
    def test_follows_the_cursor_until_complete_and_adds_up(self) -> None:
        tally = BulkTally(by_filter(reason="why"))
        first = tally.next_request(
            pb.BulkTaskResponse(changed=500, through_seq=90, next_after_seq=40, complete=False)
        )
        assert first is not None
        assert (first.through_seq, first.after_seq, first.reason) == (90, 40, "why")
        second = tally.next_request(
            pb.BulkTaskResponse(changed=120, through_seq=90, next_after_seq=90, complete=True)
        )
        assert second is None
        result = tally.result()
        assert result == BulkResult(matched=620, changed=620)
        assert result.as_of == "90"

    def test_the_limit_shrinks_with_each_call_and_ends_the_action(self) -> None:
        tally = BulkTally(by_filter(limit=700))
        follow_up = tally.next_request(
            pb.BulkTaskResponse(changed=500, through_seq=9, next_after_seq=5, complete=False)
        )
        assert follow_up is not None
        assert follow_up.limit == 200
        assert (
            tally.next_request(
                pb.BulkTaskResponse(changed=200, through_seq=9, next_after_seq=7, complete=False)
            )
            is None
        )
        assert tally.result().changed == 700

    def test_ids_and_dry_runs_are_one_call(self) -> None:
        ids = BulkTally(pb.BulkTaskRequest(task_ids=["a"]))
        response = pb.BulkTaskResponse(matched=1, changed=1, changed_ids=["a"], complete=False)
        assert ids.next_request(response) is None
        assert ids.result().changed_ids == ("a",)
        dry = BulkTally(by_filter(dry_run=True))
        assert dry.next_request(pb.BulkTaskResponse(matched=42, through_seq=77)) is None
        assert dry.result().matched == 42
        assert dry.result().as_of == "77"
