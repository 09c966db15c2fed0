"""The garbage collector settings of the long-running processes the CLI starts.

`conveyor server`, `conveyor worker` and `conveyor dev` allocate a few dozen short-lived
container objects per task (asyncio futures and handles, dicts, request objects); almost
all die by reference counting, yet CPython's default thresholds (700, 10, 10) run a young
collection every 700 net allocations and, every so often, a full collection that walks
every object the process holds, including the tens of thousands that imports and start-up
created and that live for ever. Freezing those after start-up takes them out of every
collection, and a young threshold of 20,000 runs the collector about thirty times less
often. W1 (the 20,000-task drain, docs/performance.md) rose by 11-15 % with both, with
no change in RSS. Only the processes the CLI owns are tuned: a `Worker` embedded in an
application leaves the application's collector alone.
"""

from __future__ import annotations

import gc
from typing import Final

YOUNG_THRESHOLD: Final = 20_000
MIDDLE_THRESHOLD: Final = 20
OLD_THRESHOLD: Final = 100


def tune_for_long_running_process() -> None:
    """Freeze what start-up allocated and collect less often; call once, before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
