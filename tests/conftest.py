"""Fixtures only; the helpers are in tests/helpers/."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.smtp_client import RCPTHOSTS, T1, make_cdb
from helpers.tree import Tree


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    """A qmail dir with rcpthosts and the T1 cdb: what validrcptto-policyd reads."""
    control = tmp_path / "qmail/control"
    control.mkdir(parents=True)
    (control / "rcpthosts").write_text(RCPTHOSTS)
    make_cdb(control / "validrcptto.cdb", T1)
    return tmp_path / "qmail"
