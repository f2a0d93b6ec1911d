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
from collections.abc import Callable, Collection, Iterator, Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from . import atomicfile
from .checker import CdbGetter, open_cdb
from .cdbdiff import CHUNK, REJECT, Changes, compare_live, record_count
from .errors import InstallError, InstallRefused
from .gate import Getter, accepting_under, emptied, gate, lost, set_getter, vanished
from .ident import Ident, identity
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
    identity: Ident | None = None    # of the live file after this build (ident.identity)
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


def same_content(path: str, image: mmap.mmap) -> bool | None:
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


def write_atomically(path: str, data: bytes | str | mmap.mmap | None = None,
                     fill: Callable[[BinaryIO], None] | None = None) -> None:
    """``atomicfile.replace`` (mode 0644), failures as InstallError naming the file."""
    try:
        atomicfile.replace(path, data, fill, MODE)
    except OSError as err:
        raise InstallError(f"cannot write: {err.strerror or err}", path) from None


@dataclass
class Candidate:
    """A list about to be installed and what it changes against the live one: what the
    one ``judge`` needs, made by either install path (``against_live`` reads the live
    file; an incremental build knows its changes)."""
    keys: list[bytes]                     # sorted
    rejects: AbstractSet[bytes]           # keys with the value ``-``
    domains: frozenset[bytes]             # the domains still served
    sources: dict[str, Any] | None        # what each source gave per domain (``vanished``)
    changes: Changes                      # against the live list
    old_count: int | None                 # the live list's keys (None: there is none)
    removed: list[bytes]                  # removed / added keys local users do not control
    added: list[bytes]
    users: tuple[int, int] | None         # (new, old) keys local users control
    present: Collection[bytes]            # new keys: a domain none of them names lost all
    old: Getter | None                    # lookups in the live list and in the new one
    new: Getter
    under: Callable[[bytes, bytes], bool]  # ``gate.accepting_under`` of the new list


def judge(c: Candidate, live_sources: dict[str, Any] | None, max_shrink: float,
          force: bool) -> str | None:
    """Why ``c`` must not replace the live list, or None: the gate's questions in one
    order for both install paths (what the list accepts, then a domain emptied, then a
    source that returned nothing)."""
    if force:
        return None
    asked = c.removed + c.changes.changed + [k for k in c.added if k in c.rejects]
    refused = len(lost(asked, c.old, c.new, c.under)) if asked and c.old is not None else 0
    users = c.users or (0, 0)
    old_count = None if c.old_count is None else c.old_count - users[1]
    why = gate(len(c.keys) - users[0], old_count, max_shrink, force,
               empty=len(c.keys) == 0, users=c.users, refused=refused)
    if not why:
        why = emptied(c.removed, c.present, c.domains)
    if not why and c.sources is not None and c.removed:
        why = vanished(live_sources or {}, c.sources, c.domains)
    return why


def install_result(result: Result, path: str, settings: Settings, force: bool = False,
                   stop: threading.Event | None = None,
                   keys: list[bytes] | None = None) -> Report:
    """Install a ``generate.Result`` with the gate settings of ``settings`` (``keys``:
    its sorted keys, when the caller has them)."""
    user_key = getattr(result, "user_key", None)
    offer = Offer(result.sorted_keys() if keys is None else keys, result.rejects,
                  result.keys, result.domains, getattr(result, "sources", None),
                  (result.user_count, result.is_user_key, user_key) if user_key else None)
    return install(offer, path, max_shrink=settings.max_shrink, force=force,
                   lock_timeout=settings.lock_timeout, stop=stop)


@dataclass
class Offer:
    """A whole list to install: its sorted ``keys`` (``rejects`` get the value ``-``),
    a fast container of them (``present``), the ``domains`` still served, what each
    source gave (``sources``) and, when local users control some keys, (count of the
    new ones, test for a new key, test for a live key)."""
    keys: list[bytes]
    rejects: AbstractSet[bytes] = frozenset()
    present: Collection[bytes] | None = None
    domains: frozenset[bytes] = frozenset()
    sources: dict[str, Any] | None = None
    user_keys: tuple[Callable[[], int], Callable[[bytes], bool],
                     Callable[[bytes], bool]] | None = None


def against_live(offer: Offer, path: str, image: mmap.mmap, exists: bool,
                 live: CdbGetter | None) -> Candidate:
    """The Candidate of a whole list against the live file (``exists``: there is one;
    ``live``: it opened for lookups, else None and the shrink check asks nothing)."""
    keys, rejects = offer.keys, offer.rejects
    new = offer.present if offer.present is not None else set(keys)
    old_count = record_count(live_header(path)) if exists else None
    diff = compare_live(path, keys, new, rejects, image) if old_count is not None \
        else Changes(list(keys), [], [])
    removed, added, users = diff.removed, diff.added, None
    if offer.user_keys is not None:
        # keys local users make in their own homes never move the gate
        count, is_new_user, is_user = offer.user_keys
        new_user = count()
        removed = [k for k in diff.removed if not is_user(k)]
        added = [k for k in diff.added if not is_new_user(k)] if new_user else added
        old_user = new_user - (len(diff.added) - len(added)) + len(diff.removed) \
            - len(removed)
        users = (new_user, old_user)
    return Candidate(keys, rejects, offer.domains, offer.sources, diff, old_count, removed,
                     added, users, new, live,
                     set_getter(new, rejects), accepting_under(keys, rejects))


def install(offer: Offer, path: str, *, max_shrink: float = 20.0, force: bool = False,
            lock_timeout: float = 60.0, stop: threading.Event | None = None) -> Report:
    """Install ``offer`` at ``path`` if the file would change and the list passes the
    sanity gate (``judge``).  Raises InstallRefused / InstallError, leaving ``path``
    alone."""
    started = time.monotonic()
    check_target(path)
    try:
        image = make_cdb(offer.keys, offer.rejects)
    except OSError as err:
        raise InstallError(f"cannot build the cdb in memory: {err.strerror or err}", path) from None
    with image, locked(path, lock_timeout, stop):
        check_target(path)
        remove_stale_temps(path)
        same = same_content(path, image)
        if same:
            if offer.sources is not None:
                save_sources(path, offer.sources)
            return Report(path, "unchanged", len(offer.keys),
                          seconds=time.monotonic() - started, identity=identity(path))
        with open_live(path, same is not None) as live:
            c = against_live(offer, path, image, same is not None, live)
            why = judge(c, read_sources(path), max_shrink, force)
        if why:
            raise InstallRefused(why, path)
        write_atomically(path, image)
        if offer.sources is not None:
            save_sources(path, offer.sources)
        size = len(image)
        now = identity(path)
    return Report(path, "installed", len(offer.keys), c.changes.added, c.changes.removed,
                  c.changes.changed, time.monotonic() - started, size, now)


@contextlib.contextmanager
def open_live(path: str, exists: bool) -> Iterator[CdbGetter | None]:
    """The live cdb opened for lookups (None when there is none or it cannot be
    opened: the shrink check then asks nothing of it)."""
    live: CdbGetter | None = None
    if exists:
        try:
            live = open_cdb(path)
        except OSError:
            live = None
    try:
        yield live
    finally:
        if live is not None:
            live.close()


class LiveChanged(InstallError):
    """The live cdb is not the file an incremental build's delta applies to."""


def install_delta(c: Candidate, path: str, *, expect: Ident | None, max_shrink: float,
                  force: bool, lock_timeout: float, stop: threading.Event | None = None,
                  started: float | None = None) -> Report:
    """Install the Candidate of an incremental build: the previous list (whose file had
    the identity ``expect``) with its changes applied.  The live file is neither read
    nor compared: the changes are known.  The same ``judge`` as ``install``.  Raises
    LiveChanged when someone else replaced the live file since."""
    started = time.monotonic() if started is None else started
    check_target(path)
    with locked(path, lock_timeout, stop):
        check_target(path)
        if expect is None or identity(path) != expect:
            raise LiveChanged("the live cdb is not the one the last build installed", path)
        why = judge(c, read_sources(path), max_shrink, force)
        if why:
            raise InstallRefused(why, path)
        remove_stale_temps(path)
        t0 = time.monotonic()
        # straight into the temp file beside the live one (no image in memory: nothing
        # to compare, the changes are known), fsynced and renamed as always
        write_atomically(path, fill=lambda f: write_cdb(f, c.keys, c.rejects))
        t1 = time.monotonic()
        if c.sources is not None:
            save_sources(path, c.sources)
        now = identity(path)
    done = time.monotonic()
    size = now[2] if now is not None else 0
    return Report(path, "installed", len(c.keys), c.changes.added, c.changes.removed,
                  c.changes.changed, done - started, size, now,
                  {"cdb": t1 - t0, "install": done - t1})
