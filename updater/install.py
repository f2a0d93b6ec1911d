"""Install a list as validrcptto.cdb: lock -> compare -> sanity gate -> temp -> fsync ->
rename -> fsync dir.  At every instant the live name holds the old or the new complete
file; a refused or failed build leaves it untouched.
"""

from __future__ import annotations

import contextlib
import glob
import json
import mmap
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from . import atomicfile
from .cdbdiff import CHUNK, REJECT, Changes, compare_live, record_count
from .errors import InstallError, InstallRefused
from .gate import accepting_under, emptied, gate, lost, set_getter, sorted_getter, vanished
from .inputs import Ident, identity
from .lock import locked
from .qmail import ENCODING, ERRORS

if TYPE_CHECKING:
    from .config import Settings
    from .merge import Result

MODE = 0o644


@dataclass
class Report:
    path: str
    status: str                      # "installed" or "unchanged"
    entries: int
    added: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    changed: list[bytes] = field(default_factory=list)
    seconds: float = 0.0
    bytes_written: int = 0
    identity: Ident | None = None    # of the live file after this build (inputs.identity)
    phases: dict[str, float] = field(default_factory=dict)   # seconds per step (incremental)

    def line(self) -> str:
        if self.status == "unchanged":
            return f"unchanged {self.path}: {self.entries} entries, {self.seconds:.2f}s"
        changed = f" ~{len(self.changed)}" if self.changed else ""
        return (f"installed {self.path}: {self.entries} entries, +{len(self.added)} "
                f"-{len(self.removed)}{changed}, {self.seconds:.2f}s")

    def diff_lines(self, limit: int | None = None) -> list[str]:
        """``+key`` / ``-key`` / ``~key``; at most ``limit`` of each kind."""
        def text(sign: str, keys: list[bytes]) -> list[str]:
            return [sign + k.decode(ENCODING, ERRORS) for k in keys[:limit]]
        return text("+", self.added) + text("-", self.removed) + text("~", self.changed)

    def changes_line(self, limit: int = 10) -> str | None:
        """One log line naming the first changes, or None when nothing changed."""
        shown = self.diff_lines(limit)
        if not shown:
            return None
        more = len(self.added) + len(self.removed) + len(self.changed) - len(shown)
        return "changes: " + " ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def sources_path(path: str) -> str:
    """What the last installed list's sources gave, per domain (JSON), beside the cdb."""
    return path + ".sources"


def read_sources(path: str) -> dict[str, Any] | None:
    """Our own file: a regular file, not followed through a symlink, size-capped."""
    try:
        fd = os.open(sources_path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = json.loads(os.read(fd, 16 << 20))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else None


def save_sources(path: str, counts: dict[str, Any]) -> None:
    if read_sources(path) == counts:
        return
    write_atomically(sources_path(path),
                     json.dumps(counts, sort_keys=True, separators=(",", ":")).encode())


def check_target(path: str) -> None:
    """The live cdb must be a regular file (or not exist yet) in a directory that not
    everyone may write: a symlink is refused rather than followed or replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise InstallError(f"cannot stat: {err.strerror}", path) from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise InstallError("is a symbolic link: refusing to install through it (set "
                           "VALIDRCPTTO_CDB to the real file)", path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise InstallError("is not a regular file: refusing to replace it", path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        dst = os.stat(directory)
    except OSError as err:
        raise InstallError(f"cannot use the directory: {err.strerror}", directory) from None
    if dst.st_mode & 0o002 and not dst.st_mode & stat.S_ISVTX:
        raise InstallError("directory is writable by everyone: refusing to install there",
                           directory)


def remove_stale_temps(path: str) -> int:
    """Temp files of builds that were killed; call with the lock held."""
    n = 0
    for stale in glob.glob(glob.escape(atomicfile.temp_prefix(path)) + "*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
            n += 1
    return n


def write_cdb(f: BinaryIO, keys: list[bytes], rejects: AbstractSet[bytes]) -> None:
    """The cdb of the sorted ``keys`` (``rejects`` with the value ``-``) into the open
    file ``f``, records in key order: the same keys give the same bytes."""
    import cdbx
    maker = cdbx.CDB.make(f)
    add = maker.add
    if rejects:
        for key in keys:
            add(key, REJECT if key in rejects else b"")
    else:
        for key in keys:
            add(key, b"")
    maker.commit().close()
    f.flush()


def make_cdb(keys: list[bytes], rejects: AbstractSet[bytes]) -> mmap.mmap:
    """The complete cdb image, built in memory (a memfd: nothing touches the disk) and
    returned as a read-only map of it, so it is never copied."""
    fd = os.memfd_create("validrcptto.cdb") if hasattr(os, "memfd_create") else None
    f = os.fdopen(fd, "w+b") if fd is not None else tempfile.TemporaryFile()
    with f:
        write_cdb(f, keys, rejects)
        return mmap.mmap(f.fileno(), os.fstat(f.fileno()).st_size, prot=mmap.PROT_READ)


def same_content(path: str, image: Any) -> bool | None:
    """Whether the live file holds exactly ``image`` (compared a chunk at a time);
    None when there is no live file."""
    try:
        with open(path, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != len(image):
                return False
            for offset in range(0, len(image), CHUNK):
                if f.read(CHUNK) != image[offset:offset + CHUNK]:
                    return False
            return True
    except FileNotFoundError:
        return None
    except OSError as err:
        raise InstallError(f"cannot read the live cdb: {err.strerror}", path) from None


def live_header(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(2048)
    except OSError as err:
        raise InstallError(f"cannot read the live cdb: {err.strerror}", path) from None


def write_atomically(path: str, data: Any = None,
                     fill: Callable[[BinaryIO], None] | None = None) -> None:
    """``atomicfile.replace`` (mode 0644), failures as InstallError naming the file."""
    try:
        atomicfile.replace(path, data, fill, MODE)
    except OSError as err:
        raise InstallError(f"cannot write: {err.strerror or err}", path) from None


def install_result(result: Result, path: str, settings: Settings, force: bool = False,
                   stop: threading.Event | None = None,
                   keys: list[bytes] | None = None) -> Report:
    """Install a ``generate.Result`` with the gate settings of ``settings`` (``keys``:
    its sorted keys, when the caller has them)."""
    user_key = getattr(result, "user_key", None)
    return install(result.sorted_keys() if keys is None else keys, path,
                   rejects=result.rejects, present=result.keys,
                   max_shrink=settings.max_shrink, force=force, domains=result.domains,
                   lock_timeout=settings.lock_timeout, stop=stop,
                   sources=getattr(result, "sources", None),
                   user_keys=(result.user_count, result.is_user_key, user_key)
                   if user_key else None)


def install(keys: list[bytes], path: str, *, rejects: AbstractSet[bytes] = frozenset(),
            present: Collection[bytes] | None = None, max_shrink: float = 20.0,
            force: bool = False, domains: frozenset[bytes] = frozenset(),
            lock_timeout: float = 60.0, stop: threading.Event | None = None,
            user_keys: Any = None, sources: dict[str, Any] | None = None) -> Report:
    """Install the sorted ``keys`` (``rejects`` get the value ``-``) at ``path`` if the
    file would change and the list passes the sanity gate (``domains``: the domains still
    served, none of which may lose all of its keys; ``present``: a fast container of the
    keys, if the caller has one; ``user_keys``: (count of the new keys local users control,
    test for a new key, test for a removed key) — the gate counts only the others;
    ``sources``: what each source gave per domain, see ``vanished``).  Raises InstallRefused /
    InstallError, leaving ``path`` alone."""
    started = time.monotonic()
    check_target(path)
    try:
        image = make_cdb(keys, rejects)
    except OSError as err:
        raise InstallError(f"cannot build the cdb in memory: {err.strerror or err}", path) from None
    with image, locked(path, lock_timeout, stop):
        check_target(path)
        remove_stale_temps(path)
        same = same_content(path, image)
        if same:
            if sources is not None:
                save_sources(path, sources)
            return Report(path, "unchanged", len(keys), seconds=time.monotonic() - started,
                          identity=identity(path))
        old_count = record_count(live_header(path)) if same is not None else None
        new = present if present is not None else set(keys)
        diff = compare_live(path, keys, new, rejects, image) if old_count is not None \
            else Changes(list(keys), [], [])
        removed, added = diff.removed, diff.added
        new_user = old_user = 0
        if user_keys is not None:
            # keys local users make in their own homes never move the gate
            count, is_new_user, is_user = user_keys
            new_user = count()
            removed = [k for k in diff.removed if not is_user(k)]
            added = [k for k in diff.added if not is_new_user(k)] if new_user else added
            old_user = new_user - (len(diff.added) - len(added)) + len(diff.removed) \
                - len(removed)
        refused = len(live_losses(path, removed, diff.changed, added, keys, new, rejects)) \
            if old_count is not None and not force else 0
        why = gate(len(keys) - new_user, None if old_count is None else old_count - old_user,
                   max_shrink, force, empty=len(keys) == 0,
                   users=(new_user, old_user) if user_keys is not None else None,
                   refused=refused)
        if not why and not force:
            why = emptied(removed, new, domains)
        if not why and not force and sources is not None and removed:
            why = vanished(read_sources(path) or {}, sources, domains)
        if why:
            raise InstallRefused(why, path)
        write_atomically(path, image)
        if sources is not None:
            save_sources(path, sources)
        size = len(image)
        now = identity(path)
    return Report(path, "installed", len(keys), diff.added, diff.removed, diff.changed,
                  time.monotonic() - started, size, now)


def live_losses(path: str, removed: list[bytes], changed: list[bytes], added: list[bytes],
                keys: list[bytes], new: Collection[bytes], rejects: AbstractSet[bytes]
                ) -> list[bytes]:
    """The changed keys whose addresses the live cdb accepts and the new list refuses
    (``gate.lost``); the live file is asked through cdbx, a key at a time."""
    from .checker import open_cdb
    asked = removed + changed + [k for k in added if k in rejects]
    if not asked:
        return []
    try:
        live = open_cdb(path)
    except OSError:
        return []
    try:
        return lost(asked, live, set_getter(new, rejects), accepting_under(keys, rejects))
    finally:
        live.close()


class LiveChanged(InstallError):
    """The live cdb is not the file an incremental build's delta applies to."""


def install_delta(keys: list[bytes], path: str, *, rejects: set[bytes], changes: Changes,
                  expect: Ident | None, users: tuple[int, int], old_count: int,
                  removed_admin: list[bytes], added_admin: list[bytes],
                  old_keys: list[bytes], old_rejects: AbstractSet[bytes],
                  new_keys: Collection[bytes],
                  domains: frozenset[bytes], sources: dict[str, Any], max_shrink: float,
                  force: bool, lock_timeout: float, stop: threading.Event | None = None,
                  started: float | None = None) -> Report:
    """Install the sorted ``keys`` of an incremental build: the previous list (whose
    file had the identity ``expect``) with ``changes`` applied.  The live file is neither
    read nor compared: the changes are known.  The same gate as ``install``:
    ``users``: (new, old) keys local users control, left out of the shrink count;
    ``removed_admin`` / ``added_admin``: the removed / added keys that are not theirs;
    ``old_keys`` / ``old_rejects``: the previous list; ``new_keys``: the changed
    domains' keys now (a domain none of them names has lost everything).  Raises
    LiveChanged when someone else replaced the live file since."""
    started = time.monotonic() if started is None else started
    check_target(path)
    why = None
    if not force:
        asked = removed_admin + changes.changed + [k for k in added_admin if k in rejects]
        refused = lost(asked, sorted_getter(old_keys, old_rejects), sorted_getter(keys, rejects),
                       accepting_under(new_keys, rejects)) if asked else []
        why = gate(len(keys) - users[0], old_count - users[1], max_shrink, force,
                   empty=len(keys) == 0, users=users, refused=len(refused))
        if not why:
            why = emptied(removed_admin, new_keys, domains)
    with locked(path, lock_timeout, stop):
        check_target(path)
        if expect is None or identity(path) != expect:
            raise LiveChanged("the live cdb is not the one the last build installed", path)
        if not why and not force and removed_admin:
            why = vanished(read_sources(path) or {}, sources, domains)
        if why:
            raise InstallRefused(why, path)
        remove_stale_temps(path)
        t0 = time.monotonic()
        # straight into the temp file beside the live one (no image in memory: nothing
        # to compare, the changes are known), fsynced and renamed as always
        write_atomically(path, fill=lambda f: write_cdb(f, keys, rejects))
        t1 = time.monotonic()
        save_sources(path, sources)
        now = identity(path)
    done = time.monotonic()
    size = now[2] if now is not None else 0
    return Report(path, "installed", len(keys), changes.added, changes.removed,
                  changes.changed, done - started, size, now,
                  {"cdb": t1 - t0, "install": done - t1})
