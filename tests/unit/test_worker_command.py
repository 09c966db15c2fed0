"""`conveyor worker --call-timeout`: a value the Worker would refuse is a usage error.

The flag (or CONVEYOR_WORKER_CALL_TIMEOUT) sets the deadline of the worker's calls. A value
outside the Worker's own bounds (0.5 s to an hour) ends the command before any module is
imported, with status 2 and one `Error:` line naming the flag, as every other flag's does.
That the value reaches the running worker is checked end to end in tests/e2e/test_cli.py.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conveyor.cli.worker_command import worker

# Never imported: the usage error comes first.
SPEC = "no_such_module_for_this_test:worker"


@pytest.mark.parametrize("value", ["0", "-1", "0.1", "nan", "inf", "3601", "1e300", "ten"])
@pytest.mark.parametrize("source", ["flag", "environment"])
def test_a_call_timeout_the_worker_would_refuse_is_a_usage_error(value: str, source: str) -> None:
    if source == "flag":
        result = CliRunner().invoke(worker, [SPEC, "--call-timeout", value])
    else:
        result = CliRunner().invoke(worker, [SPEC], env={"CONVEYOR_WORKER_CALL_TIMEOUT": value})
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("Error: Invalid value for '--call-timeout'"), errors[0]
    assert "Traceback" not in result.output
    assert "no_such_module" not in result.output  # refused before the import was tried
