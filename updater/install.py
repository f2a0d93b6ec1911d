"""Install a list as validrcptto.cdb: lock -> compare -> sanity gate -> temp -> fsync ->
rename -> fsync dir.  At every instant the live name holds the old or the new complete
file; a refused or failed build leaves it untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

from .errors import InstallError, InstallRefused
from .qmail import ENCODING, ERRORS

MODE = 0o644


@dataclass
class Report:
    path: str
    status: str                      # "installed" or "unchanged"
    entries: int
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes_written: int = 0

    def line(self) -> str:
        if self.status == "unchanged":
            return f"unchanged {self.path}: {self.entries} entries, {self.seconds:.2f}s"
        changed = f" ~{len(self.changed)}" if self.changed else ""
        return (f"installed {self.path}: {self.entries} entries, +{len(self.added)} "
                f"-{len(self.removed)}{changed}, {self.seconds:.2f}s")

    def diff_lines(self) -> list[str]:
        return ([f"+{k}" for k in self.added] + [f"-{k}" for k in self.removed]
                + [f"~{k}" for k in self.changed])


def gate(new_count: int, old_count: int | None, max_shrink: float, force: bool) -> str | None:
    """Why a new list must not replace the live one, or None (pure)."""
    if force:
        return None
    if new_count == 0:
        return "refusing to install an empty list (--force installs it anyway)"
    if old_count and max_shrink > 0:
        shrink = (old_count - new_count) * 100.0 / old_count
        if shrink > max_shrink:
            return (f"refusing to install: the list shrinks by {shrink:.1f}% "
                    f"({old_count} -> {new_count} entries), more than the {max_shrink:g}% "
                    "allowed (--max-shrink; --force installs it anyway)")
    return None


def emptied(old: dict[str, str], new: dict[str, str], domains: frozenset[str]) -> str | None:
    """Why a list must not be installed because a domain we still receive mail for lost
    all of its keys (a source returned nothing for it), or None (pure)."""
    if not domains or not old:
        return None
    removed = old.keys() - new.keys()
    lost = {k.rpartition("@")[2] for k in removed if "@" in k} & domains
    if not lost:
        return None
    gone = sorted(lost - {k.rpartition("@")[2] for k in new if "@" in k})
    if not gone:
        return None
    had = sum(1 for k in old if k.rpartition("@")[2] == gone[0])
    more = f" (and {len(gone) - 1} more domains)" if len(gone) > 1 else ""
    return (f"refusing to install: {gone[0]} had {had} entries and now has none{more}; "
            "did a source return nothing? (--force installs it anyway)")


def read_cdb(path: str) -> dict[str, str] | None:
    """The live file as key -> value; None if it does not exist or cannot be parsed."""
    import cdbx
    try:
        db = cdbx.CDB(path)
    except FileNotFoundError:
        return None
    except Exception:
        return None
    try:
        return {k.decode(ENCODING, ERRORS): db[k].decode(ENCODING, ERRORS) for k in db}
    except Exception:
        return None
    finally:
        db.close()


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive lock beside the cdb, so two builders never interleave."""
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, MODE)
    except OSError as err:
        raise InstallError(f"cannot open lock file: {err.strerror}", lock_path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _temp_pattern(path: str) -> str:
    d, base = os.path.split(path)
    return os.path.join(d or ".", f".{base}.tmp.")


def remove_stale_temps(path: str) -> int:
    """Temp files of builds that were killed; call with the lock held."""
    n = 0
    for stale in glob.glob(glob.escape(_temp_pattern(path)) + "*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
            n += 1
    return n


def write_cdb(path: str, items: list[tuple[str, str]]) -> int:
    """Write a complete cdb under a unique temp name in the target's directory, fsync it,
    rename it over ``path`` and fsync the directory.  Returns the bytes written."""
    import cdbx
    directory = os.path.dirname(path) or "."
    prefix = os.path.basename(_temp_pattern(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    except OSError as err:
        raise InstallError(f"cannot create a temporary file: {err.strerror}", directory) from None
    try:
        with os.fdopen(fd, "w+b") as f:
            maker = cdbx.CDB.make(f)
            add = maker.add
            for key, value in items:
                add(key.encode(ENCODING, ERRORS), value.encode(ENCODING, ERRORS))
            maker.commit().close()
            os.fchmod(f.fileno(), MODE)
            os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise InstallError(f"cannot write: {err.strerror or err}", path) from None
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return size


def install(items: list[tuple[str, str]], path: str, *, max_shrink: float = 20.0,
            force: bool = False, domains: frozenset[str] = frozenset()) -> Report:
    """Install ``items`` (sorted (key, value) pairs) at ``path`` if they changed and
    pass the sanity gate (``domains``: the domains still served, for the rule that no
    such domain may lose all of its keys).  Raises InstallRefused / InstallError, leaving ``path`` alone."""
    started = time.monotonic()
    new = dict(items)
    with locked(path):
        remove_stale_temps(path)
        old = read_cdb(path)
        if old is not None and old == new:
            return Report(path, "unchanged", len(new), seconds=time.monotonic() - started)
        why = gate(len(new), len(old) if old is not None else None, max_shrink, force) or \
            (None if force else emptied(old or {}, new, domains))
        if why:
            raise InstallRefused(why, path)
        size = write_cdb(path, items)
    old = old or {}
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    changed = sorted(k for k in new.keys() & old.keys() if new[k] != old[k])
    return Report(path, "installed", len(new), added, removed, changed,
                  time.monotonic() - started, size)
