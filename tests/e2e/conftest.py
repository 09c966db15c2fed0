"""Fixtures for the end-to-end tests (`server_process` lives in tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import TESTS_DIR

E2E_DIR = Path(__file__).parent


@pytest.fixture
def e2e_pythonpath() -> str:
    """PYTHONPATH for child processes that import modules from tests/ and tests/e2e/.

    The test run's own PYTHONPATH stays behind them: a checkout run with its sources first
    on the path (a worktree beside the installed one) must run its own code in the children.
    """
    inherited = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (str(TESTS_DIR), str(E2E_DIR), inherited) if p)
