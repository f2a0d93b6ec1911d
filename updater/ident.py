"""A file's identity: (device, inode, size, mtime ns, ctime ns), the one tuple every
part compares to notice a change (the daemon's live cdb and inputs, the servers' cdb
snapshots and control files).  A leaf module: it imports nothing of ours."""

from __future__ import annotations

import os

Ident = tuple[int, int, int, int, int]


def of_stat(st: os.stat_result) -> Ident:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def identity(path: str) -> Ident | None:
    """The identity of ``path`` (symlinks followed), or None when it cannot be
    stat()ed."""
    try:
        return of_stat(os.stat(path))
    except (OSError, ValueError):
        return None


def identities(paths: list[str]) -> dict[str, Ident | None]:
    return {p: identity(p) for p in paths}
