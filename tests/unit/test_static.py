"""Lint, format and types are part of the suite, so CI enforces them on every commit.

The tools come pinned from requirements-test.lock, so a new release of ruff or mypy
cannot turn a known-good commit red; their configuration lives in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from support.harness import REPO

CHECKS = {
    "ruff check": [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
    "ruff format": [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."],
    "mypy": [sys.executable, "-m", "mypy"],
    "mypy bench": [sys.executable, "-m", "mypy", "bench"],
}


@pytest.mark.parametrize("name", CHECKS)
def test_clean(name: str) -> None:
    done = subprocess.run(
        CHECKS[name], cwd=REPO, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, f"{name} found problems:\n{done.stdout}{done.stderr}"
