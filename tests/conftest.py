"""Fixtures only; the helpers are in tests/helpers/."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers.smtp_client import RCPTHOSTS, T1, make_cdb
from helpers.tools import need
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


@pytest.fixture
def vpopmail_account():
    """vpopmail as its installs make it (groupadd vchkpw; useradd -g vchkpw vpopmail),
    created for the test when the system has none, and removed after."""
    import grp
    import pwd
    made = []
    try:
        grp.getgrnam("vchkpw")
    except KeyError:
        subprocess.run([need("groupadd"), "vchkpw"], check=True)
        made.append(("groupdel", "vchkpw"))
    try:
        pwd.getpwnam("vpopmail")
    except KeyError:
        subprocess.run([need("useradd"), "-g", "vchkpw", "-M", "-d", "/nonexistent",
                        "vpopmail"], check=True)
        made.insert(0, ("userdel", "vpopmail"))
    try:
        yield pwd.getpwnam("vpopmail")
    finally:
        for cmd, name in made:
            subprocess.run([need(cmd), name], capture_output=True)
