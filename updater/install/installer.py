"""Install a list as validrcptto.cdb: lock -> compare -> sanity gate -> temp -> fsync ->
rename -> fsync dir.  At every instant the live name holds the old or the new complete
file; a refused or failed build leaves it untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import atomicfile
from ..build.qmail import ENCODING, ERRORS, part_of
from ..checker import REJECT, CdbGetter, open_cdb
from ..errors import InstallError
from ..ident import Ident, identity, of_stat
from ..limits import MAX_GARBAGE
from . import stablecdb
from .cdbdiff import Changes, compare_live, live_header, record_count, same_content
from .gate import accepting_under, set_getter
from .liverecord import read_record, save_record, write_atomically
from .lock import locked
from .outcome import InstallReport
from .stablecdb import NotCdb, make_cdb, read_items, write_cdb
from .verdict import NO_INTENT, Candidate, Intent, counts_of, settle

if TYPE_CHECKING:
    from ..build.merge import Result
    from ..config import Settings

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


def install_result(result: Result, path: str, settings: Settings, force: bool = False,
                   stop: threading.Event | None = None, keys: list[bytes] | None = None,
                   intent: Intent | None = None) -> InstallReport:
    """Install a ``generate.Result`` with the gate settings of ``settings`` (``keys``:
    its sorted keys, when the caller has them)."""
    user_key = getattr(result, "user_key", None)
    # (no key of the new list comes from a user's own files: none to test one by one)
    is_new = result.is_user_key if getattr(result, "user_origins", None) else never
    offer = Offer(result.sorted_keys() if keys is None else keys, result.rejects,
                  result.keys, result.domains, getattr(result, "sources", None),
                  (is_new, user_key) if user_key else None,
                  result.bare)
    base = intent or Intent()
    intent = dataclasses.replace(
        base, now=base.now or time.time(), configured=result.configured,
        failed={**{d.encode(ENCODING, ERRORS): why for d, why in result.failed.items()},
                **base.failed})
    return install(offer, path, max_shrink=settings.max_shrink, force=force,
                   lock_timeout=settings.lock_timeout, stop=stop, intent=intent)


def never(key: bytes) -> bool:
    """The user-key test of a list no local user's files add to."""
    return False


@dataclass
class Offer:
    """A whole list to install: its sorted ``keys`` (``rejects`` get the value ``-``),
    a fast container of them (``present``), the ``domains`` still served, what each
    source gave (``sources``) and, when local users control some keys, (test for a
    new key, test for a live key: theirs never move the gate); ``bare``: the envnoathost
    domain (its keys come bare too)."""
    keys: list[bytes]
    rejects: AbstractSet[bytes] = frozenset()
    present: Collection[bytes] | None = None
    domains: frozenset[bytes] = frozenset()
    sources: dict[str, Any] | None = None
    user_keys: tuple[Callable[[bytes], bool], Callable[[bytes], bool]] | None = None
    bare: bytes | None = None


def live_entries(path: str, domains: AbstractSet[bytes], bare: bytes | None
                 ) -> tuple[list[bytes], set[bytes]]:
    """The keys of ``domains`` in the live cdb and which of them reject (one pass over
    it, only when a domain is held).  A domain the live list has nothing of (a first
    build whose source failed) gets ``@domain``: accepting it all for now, never a
    permanent refusal of an address that may be listed.  A live file that cannot be
    read raises InstallError (it is left as it is)."""
    keys: list[bytes] = []
    rejects: set[bytes] = set()
    seen: set[bytes] = set()
    try:
        for k, v in read_items(path):
            d = part_of(k, bare)
            if d in domains:
                keys.append(k)
                seen.add(d)
                if v[:1] == REJECT:
                    rejects.add(k)
    except FileNotFoundError:
        pass                              # a first build: nothing to keep
    except (OSError, NotCdb) as err:
        # (what the held domains had is unknown: replacing the file could lose it)
        why = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise InstallError(f"cannot read the held domains' live entries: {why}",
                           path) from None
    keys += [b"@" + d for d in domains - seen if d]
    return keys, rejects


def holding(offer: Offer, held: AbstractSet[bytes], path: str) -> Offer:
    """``offer`` with the ``held`` domains' keys replaced by their live ones."""
    if not held:
        return offer
    live, live_rejects = live_entries(path, held, offer.bare)
    keys = [k for k in offer.keys if part_of(k, offer.bare) not in held]
    keys = sorted(set(keys).union(live))
    rejects = {k for k in offer.rejects if part_of(k, offer.bare) not in held} | live_rejects
    user_keys = None
    if offer.user_keys is not None:
        is_new_user, is_user = offer.user_keys

        def mine(k: bytes) -> bool:             # (a held domain's keys are its live ones)
            return is_new_user(k) and part_of(k, offer.bare) not in held
        user_keys = (never if is_new_user is never else mine, is_user)
    return dataclasses.replace(offer, keys=keys, rejects=rejects, present=set(keys),
                               user_keys=user_keys)


def against_live(offer: Offer, path: str, image: mmap.mmap, exists: bool,
                 live: CdbGetter | None, canonical: bool) -> Candidate:
    """The Candidate of a whole list against the live file (``exists``: there is one;
    ``live``: it opened for lookups, else None and the shrink check asks nothing;
    ``canonical``: its record says a full build wrote it and nothing since)."""
    keys, rejects = offer.keys, offer.rejects
    new = offer.present if offer.present is not None else set(keys)
    old_count = record_count(live_header(path)) if exists else None
    diff = compare_live(path, keys, new, rejects, image, canonical) if old_count is not None \
        else Changes(list(keys), [], [])
    removed, added = diff.removed, diff.added
    is_new_user: Callable[[bytes], bool] | None = None
    if offer.user_keys is not None:
        # keys local users make in their own homes never move the gate
        is_new_user, is_user = offer.user_keys
        removed = [k for k in diff.removed if not is_user(k)]
        if is_new_user is never:
            is_new_user = None
        else:
            added = [k for k in diff.added if not is_new_user(k)]
    return Candidate(keys, rejects, offer.domains, offer.sources, diff, removed, added,
                     live, set_getter(new, rejects),
                     accepting_under(keys, rejects),
                     counts_of(keys, rejects, offer.bare, is_new_user), offer.bare,
                     whole=True)


def install(offer: Offer, path: str, *, max_shrink: float, force: bool = False,
            lock_timeout: float, stop: threading.Event | None = None,
            intent: Intent = NO_INTENT) -> InstallReport:
    """Install ``offer`` at ``path`` if the file would change, each domain the gate
    doubts (or whose source failed, ``intent.failed``) keeping its live entries
    (``settle``).  Raises InstallRefused / InstallError, leaving ``path`` alone."""
    started = time.monotonic()
    check_target(path)
    images: list[mmap.mmap] = []

    def make(held: frozenset[bytes], live: CdbGetter | None, exists: bool,
             canonical: bool) -> Candidate:
        o = holding(offer, held, path)
        try:
            image = make_cdb(o.keys, o.rejects)
        except OSError as err:
            raise InstallError(f"cannot build the cdb in memory: {err.strerror or err}",
                               path) from None
        images.append(image)
        same = same_content(path, image)
        if same:                      # nothing changes: nothing to judge
            present = o.present if o.present is not None else set(o.keys)
            return Candidate(o.keys, o.rejects, o.domains, o.sources, Changes([], [], []),
                             [], [], None, set_getter(present, o.rejects),
                             lambda p, d: False, bare=o.bare, image=image, same=True,
                             whole=True)
        c = against_live(o, path, image, exists, live, canonical)
        c.image, c.same = image, same
        return c

    try:
        with locked(path, lock_timeout, stop):
            check_target(path)
            remove_stale_temps(path)
            exists = os.path.lexists(path)
            was = read_record(path)
            garbage = was.garbage_of(identity(path))
            canonical = was.canonical_for(identity(path))
            with open_live(path, exists) as live:
                c, record = settle(lambda held: make(held, live, exists, canonical), was,
                                   max_shrink, force, intent, path)
            assert c.image is not None
            if c.same:                    # (the image is canonical: so is the live file)
                save_record(path, record.describing(identity(path), 0, True))
                return InstallReport(path, "unchanged", len(c.keys),
                                     seconds=time.monotonic() - started,
                                     identity=identity(path), held=record.held)
            write_atomically(path, c.image)
            save_record(path, record.describing(identity(path), 0, True))
            size = len(c.image)
            now = identity(path)
    finally:
        for image in images:
            image.close()
    return InstallReport(path, "installed", len(c.keys), c.changes.added, c.changes.removed,
                         c.changes.changed, time.monotonic() - started, size, now,
                         held=record.held,
                         compacted=exists and garbage is not None and not canonical)


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


def install_delta(make: Callable[[frozenset[bytes]], Candidate], path: str, *,
                  expect: Ident | None, max_shrink: float, force: bool, lock_timeout: float,
                  stop: threading.Event | None = None, started: float | None = None,
                  intent: Intent = NO_INTENT) -> tuple[InstallReport, Candidate]:
    """Install the Candidate of an incremental build (``make(held)``: the previous list,
    whose file had the identity ``expect``, with its changes applied, the ``held``
    domains left as they were).  The live file is neither read nor compared: the
    changes are known.  The same ``settle`` as ``install``.  Raises LiveChanged when
    someone else replaced the live file since.  Returns the report and the candidate
    installed."""
    started = time.monotonic() if started is None else started
    check_target(path)
    with locked(path, lock_timeout, stop):
        check_target(path)
        if expect is None or identity(path) != expect:
            raise LiveChanged("the live cdb is not the one the last build installed", path)
        was = read_record(path)
        c, record = settle(make, was, max_shrink, force, intent, path)
        remove_stale_temps(path)
        t0 = time.monotonic()
        empty = not (c.changes.added or c.changes.removed or c.changes.changed)
        garbage = before = was.garbage_of(expect)
        canonical = was_canonical = was.canonical_for(expect)
        if not empty:
            garbage, canonical = write_delta(path, c, expect, before)
        t1 = time.monotonic()
        now = identity(path)
        save_record(path, record if garbage is None else
                    record.describing(now, garbage, canonical))
    done = time.monotonic()
    size = now[2] if now is not None else 0
    return InstallReport(path, "unchanged" if empty else "installed", len(c.keys),
                         c.changes.added, c.changes.removed, c.changes.changed,
                         done - started, size, now, {"cdb": t1 - t0, "install": done - t1},
                         held=record.held,
                         compacted=before is not None and canonical and not was_canonical), c


def write_delta(path: str, c: Candidate, expect: Ident, garbage: int | None
                ) -> tuple[int, bool]:
    """Install an incremental build's candidate ``c`` over the live file (identity
    ``expect``, ``garbage`` unreachable bytes, None when unknown): its records kept
    where they are and only the changes written (``stablecdb.rewrite``), or, once the
    garbage passes ``MAX_GARBAGE`` of the file (or is unknown), the canonical file of
    a full build: a compaction.  Returns the garbage of the file installed and whether
    it is that canonical file."""
    if garbage is not None:
        try:
            fd, buf = stablecdb.open_file(path)
        except (OSError, NotCdb):
            fd, buf = -1, None
        try:
            if fd >= 0 and of_stat(os.fstat(fd)) != expect:
                raise LiveChanged("the live cdb is not the one the last build installed",
                                  path)
            if buf is not None and garbage <= MAX_GARBAGE * len(buf):
                put = [(k, REJECT if k in c.rejects else b"")
                       for k in (*c.changes.added, *c.changes.changed)]
                left: list[int] = []
                write_atomically(path, fill=lambda f: left.append(
                    stablecdb.rewrite(fd, buf, f, c.changes.removed, put)))
                return garbage + left[0], False
        except (NotCdb, OverflowError, stablecdb.Cheaper):
            pass                                  # (a compaction writes it)
        finally:
            if fd >= 0:
                os.close(fd)
    write_atomically(path, fill=lambda f: write_cdb(f, c.keys, c.rejects))
    return 0, True


def no_room(path: str, needs: int) -> str | None:
    """Why an install at ``path`` cannot be tried yet: its file system has fewer than
    ``needs`` bytes free (after ENOSPC the daemon asks this every second, so a freed
    disk is used within a second and a full one costs a statvfs, not a build)."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path or ".")))
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free >= needs:
        return None
    return f"no space left on the device ({free} bytes free, about {needs} needed)"
