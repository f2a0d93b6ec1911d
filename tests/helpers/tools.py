"""The real tools the tests drive: our console scripts, Debian's programs (under CI=true
a missing one fails the test, never skips it)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent.parent


def need(tool: str) -> str:
    """The path of a real tool; under CI=true a missing tool fails the test."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        if CI:
            pytest.fail(f"{tool} is required under CI=true (apt-get install it in .ci/run)")
        pytest.skip(f"{tool} not installed: apt-get install its package (.ci/run lists them)")
    return path


def script(name: str) -> str:
    """One of our console scripts, as installed next to this Python."""
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        assert found, f"{name} is not installed: pip install -e ."
        return found
    return str(path)
