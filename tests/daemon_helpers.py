"""Helpers shared by the daemon, hardening, publish and generator tests (no test file
imports another test file)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import Tree, need

ROOT = Path(__file__).resolve().parent.parent


def setup_tree(tree: Tree, users: int = 3) -> Path:
    tree.control("me", "mail.example.com\n")
    tree.control("rcpthosts", "example.com\nvpop.example\n")
    tree.control("locals", "example.com\n")
    tree.control("virtualdomains", "vpop.example:vpop.example\n")
    tree.account("joe")
    d = tree.vpop_domain("vpop.example", users=tuple(f"u{i}" for i in range(users)))
    return d


def keys_of(path: Path) -> set[str]:
    import cdbx
    db = cdbx.CDB(str(path))
    try:
        return {k.decode() for k in db}
    finally:
        db.close()


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


def without_dac_override() -> list[str]:
    """root reads every file whatever its mode; drop that power (util-linux setpriv) so a
    mode-000 directory is unreadable, as it is to a non-root builder."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return [need("setpriv"), "--bounding-set", caps, "--inh-caps", caps]
