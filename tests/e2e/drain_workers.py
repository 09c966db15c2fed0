"""A worker for the signal tests: worker_apps' handlers with a 3-second drain timeout.

Run as `conveyor worker drain_workers:worker` with both tests/ and tests/e2e/ on PYTHONPATH
(see `e2e_pythonpath` in tests/e2e/conftest.py). Handlers record to the same ledger
(CONVEYOR_TEST_LEDGER) as every other test worker.
"""

from __future__ import annotations

from datetime import timedelta

from worker_apps import build

DRAIN_TIMEOUT = timedelta(seconds=3)

worker = build()
worker.configure(drain_timeout=DRAIN_TIMEOUT)
