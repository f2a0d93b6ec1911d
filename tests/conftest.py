"""Fixtures only; the helpers are in tests/helpers/."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.tree import Tree


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)
