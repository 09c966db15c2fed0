"""One table maps Conveyor errors to gRPC status codes and back."""

from __future__ import annotations

import grpc
import pytest

from conveyor import errors
from conveyor.protocol.status import error_from_status, status_for


class TestErrorStatusRoundTrip:
    @pytest.mark.parametrize(
        ("error", "code"),
        [
            (errors.InvalidTask("bad type"), grpc.StatusCode.INVALID_ARGUMENT),
            (errors.TaskNotFound(task_id="x"), grpc.StatusCode.NOT_FOUND),
            (errors.TaskAlreadyFinished("done"), grpc.StatusCode.FAILED_PRECONDITION),
            (errors.LeaseLost("stale"), grpc.StatusCode.FAILED_PRECONDITION),
            (errors.ServerUnavailable("db down"), grpc.StatusCode.UNAVAILABLE),
        ],
    )
    def test_error_survives_the_wire_as_the_same_class(
        self, error: errors.ConveyorError, code: grpc.StatusCode
    ) -> None:
        """status_for then error_from_status gives back the class and the message."""
        sent_code, message = status_for(error)
        assert sent_code == code
        received = error_from_status(sent_code, message)
        assert type(received) is type(error)
        assert error.message in received.message

    @pytest.mark.parametrize(
        ("error", "attributes"),
        [
            (errors.TaskNotFound(task_id="t-1"), {"task_id": "t-1"}),
            (
                errors.TaskAlreadyFinished(task_id="t-2", state="failed"),
                {"task_id": "t-2", "state": "failed"},
            ),
            # Another text (an older server's) keeps the message and leaves them unknown.
            (errors.TaskNotFound("no such task"), {"task_id": None}),
            (errors.TaskAlreadyFinished("done"), {"task_id": None, "state": None}),
        ],
    )
    def test_the_context_attributes_survive_the_wire(
        self, error: errors.ConveyorError, attributes: dict[str, str | None]
    ) -> None:
        """Only the message crosses: the attributes were None on the client's side."""
        received = error_from_status(*status_for(error))
        assert {name: getattr(received, name) for name in attributes} == attributes

    def test_unmapped_codes_become_a_plain_conveyor_error_with_the_code_name(self) -> None:
        """INTERNAL and friends surface as ConveyorError naming the code."""
        received = error_from_status(grpc.StatusCode.INTERNAL, "boom")
        assert type(received) is errors.ConveyorError
        assert "INTERNAL" in received.message

    def test_deadline_exceeded_is_reported_as_unavailable(self) -> None:
        """A call that timed out means no server answered in time."""
        received = error_from_status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        assert isinstance(received, errors.ServerUnavailable)
