"""The collector settings of CLI-started processes (their effect is measured in benchmarks/)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc
from conveyor.cli.gc_policy import tune_for_long_running_process
before = gc.get_freeze_count()
tune_for_long_running_process()
print(before, gc.get_freeze_count(), *gc.get_threshold())
"""


def test_tuning_freezes_the_start_up_heap_and_raises_the_thresholds() -> None:
    # In a child process: the test runner's own collector is left as it is.
    out = subprocess.run(
        [sys.executable, "-c", PROBE], check=True, capture_output=True, text=True, timeout=60
    ).stdout.split()
    before, frozen, young, middle, old = map(int, out)
    assert before == 0
    assert frozen > 1000, "the modules imported at start-up were not frozen"
    assert (young, middle, old) == (20_000, 20, 100)
