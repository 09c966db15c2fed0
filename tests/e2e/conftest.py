"""Fixtures for the end-to-end tests (`server_process` lives in tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import TESTS_DIR

E2E_DIR = Path(__file__).parent


@pytest.fixture
def e2e_pythonpath() -> str:
    """PYTHONPATH for child processes that import modules from tests/ and tests/e2e/."""
    return os.pathsep.join([str(TESTS_DIR), str(E2E_DIR)])
