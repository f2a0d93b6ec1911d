"""Install a list as validrcptto.cdb: lock -> compare -> sanity gate -> temp -> fsync ->
rename -> fsync dir.  At every instant the live name holds the old or the new complete
file; a refused or failed build leaves it untouched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import mmap
import os
import stat
import struct
import tempfile
import time
from dataclasses import dataclass, field
from collections.abc import Iterator

from .errors import InstallError, InstallRefused
from .inputs import Ident, identity
from .qmail import ENCODING, ERRORS

MODE = 0o644
REJECT = b"-"          # the value of a key that rejects (REFERENCE §1)
CHUNK = 1 << 20        # compare and copy files a MiB at a time


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


def gate(new_count: int, old_count: int | None, max_shrink: float, force: bool,
         empty: bool | None = None, users: tuple[int, int] | None = None) -> str | None:
    """Why a new list must not replace the live one, or None (pure).  The counts are of
    the keys the admin controls; ``users``: (new, old) keys local users control, left
    out of the counts; ``empty``: the whole new list is empty."""
    if force:
        return None
    if (new_count == 0) if empty is None else empty:
        return "refusing to install an empty list (--force installs it anyway)"
    if old_count and max_shrink > 0:
        shrink = (old_count - new_count) * 100.0 / old_count
        if shrink > max_shrink:
            mine = f", not counting {users[1]} -> {users[0]} keys of local users' own " \
                ".qmail files" if users and (users[0] or users[1]) else ""
            return (f"refusing to install: the list shrinks by {shrink:.1f}% "
                    f"({old_count} -> {new_count} entries{mine}), more than the "
                    f"{max_shrink:g}% allowed (--max-shrink; --force installs it anyway)")
    return None


def emptied(removed: list[bytes], new, domains: frozenset[bytes]) -> str | None:
    """Why a list must not be installed because a domain we still receive mail for lost
    all of its keys (a source returned nothing for it), or None (pure).  ``removed``:
    the live keys not in the new list; ``new``: any container of the new keys."""
    lost = {k.rpartition(b"@")[2] for k in removed if b"@" in k} & domains
    if not lost:
        return None
    gone = sorted(lost - {k.rpartition(b"@")[2] for k in new if b"@" in k})
    if not gone:
        return None
    had = sum(1 for k in removed if k.rpartition(b"@")[2] == gone[0])   # all of them went
    more = f" (and {len(gone) - 1} more domains)" if len(gone) > 1 else ""
    name = gone[0].decode(ENCODING, ERRORS)
    return (f"refusing to install: {name} had {had} entries and now has none{more}; "
            "did a source return nothing? (--force installs it anyway)")


KIND_WORDS = {"users": "vpopmail users", "valias": "valias entries", "ldap": "LDAP addresses",
              "fastforward": "fastforward entries"}


def vanished(old: dict, new: dict, domains: frozenset[bytes]) -> str | None:
    """Why a list must not be installed because a source gave nothing for a domain we
    still serve where it gave entries last time (a vpasswd emptied, a valias table or an
    LDAP search returning nothing), although the domain keeps other keys; or None
    (pure).  ``old``/``new``: domain -> kind of source -> names it gave."""
    for domain in sorted(old):
        if domain.encode(ENCODING, ERRORS) not in domains or not isinstance(old[domain], dict):
            continue
        for kind, had in sorted(old[domain].items()):
            if isinstance(had, int) and had > 0 and new.get(domain, {}).get(kind, 0) == 0:
                return (f"refusing to install: the {KIND_WORDS.get(kind, kind)} of {domain} "
                        f"are gone ({had} last time, none now); did a source return nothing? "
                        "(--force installs it anyway)")
    return None


def sources_path(path: str) -> str:
    """What the last installed list's sources gave, per domain (JSON), beside the cdb."""
    return path + ".sources"


def read_sources(path: str) -> dict | None:
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


def save_sources(path: str, counts: dict) -> None:
    if read_sources(path) == counts:
        return
    write_atomically(sources_path(path),
                     json.dumps(counts, sort_keys=True, separators=(",", ":")).encode())


@dataclass
class Changes:
    added: list[bytes]
    removed: list[bytes]
    changed: list[bytes]         # in both lists, but the value (accept / ``-``) differs


def compare_live(path: str, keys: list[bytes], new, rejects: set[bytes],
                 image=None) -> Changes:
    """The changes from the live cdb to the sorted ``keys``.  When the live file and the
    new ``image`` differ only in a small stretch (the everyday case: a user added or
    removed), only that stretch is parsed; otherwise one streaming pass over the live
    file (a million-key list is never held twice).  A live file that cannot be parsed
    counts as empty."""
    if image is not None:
        try:
            with open(path, "rb") as f:
                quick = changed_stretch(FileBytes(f.fileno()), image, keys, rejects, new)
        except (OSError, ValueError, struct.error):
            quick = None
        if quick is not None:
            return quick
    import cdbx
    removed: list[bytes] = []
    turned: list[bytes] = []                 # live "-" keys that now accept
    try:
        db = cdbx.CDB(path)
    except Exception:
        return Changes(list(keys), [], [])
    try:
        for k, v in db.items(all=True):
            if k not in new:
                removed.append(k)
            elif v and k not in rejects:
                turned.append(k)
        added = [k for k in keys if k not in db]
        changed = turned + [k for k in rejects if k in db and db.get(k) != REJECT]
    except Exception:
        return Changes(list(keys), [], [])
    finally:
        db.close()
    return Changes(added, sorted(removed), sorted(changed))


STRETCH_LIMIT = 1 << 22      # parse at most this many bytes of changed records in Python


class FileBytes:
    """A file read by slices (``pread``), so comparing it never maps it all in memory."""

    def __init__(self, fd: int):
        self.fd, self.size = fd, os.fstat(fd).st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, part: slice) -> bytes:
        start, stop, _ = part.indices(self.size)
        return os.pread(self.fd, max(0, stop - start), start)


def changed_stretch(old, image, keys: list[bytes], rejects: set[bytes], new) -> Changes | None:
    """The changes between two cdbs whose records differ only in one stretch (pure).

    Both files keep their records from byte 2048 up to their hash tables.  The records
    before the first differing byte are the same in both, and so are those after the
    last one (checked: the old file's records must parse to exactly that point), so only
    the records in between are compared.  None when the files are not laid out that way
    or the stretch is too big to be worth it (the caller then streams the whole file)."""
    from array import array
    from bisect import bisect_left
    from itertools import accumulate
    if len(old) < 2048 or len(image) < 2048:
        return None
    old_end = min(struct.unpack("<512L", old[:2048])[0::2])
    new_end = min(struct.unpack("<512L", image[:2048])[0::2])
    if not 2048 <= old_end <= len(old) or not 2048 <= new_end <= len(image):
        return None
    same_head = _common(old, image, 2048, old_end, new_end)
    same_tail = _common(old, image, 2048 + same_head, old_end, new_end, from_end=True)
    # where new record i starts: 8 bytes of lengths per record, the keys, the "-" values
    key_bytes = array("Q", accumulate(map(len, keys), initial=0))
    reject_at = sorted(i for i in (bisect_left(keys, r) for r in rejects)
                       if i < len(keys) and keys[i] in rejects)

    def start(i: int) -> int:
        return 2048 + 8 * i + key_bytes[i] + bisect_left(reject_at, i)

    lo, hi = 0, len(keys)                    # last record start inside the common head
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if start(mid) <= 2048 + same_head:
            lo = mid
        else:
            hi = mid - 1
    first = lo
    lo, hi = first, len(keys)                # first record start inside the common tail
    while lo < hi:
        mid = (lo + hi) // 2
        if start(mid) >= new_end - same_tail:
            hi = mid
        else:
            lo = mid + 1
    last = lo
    old_from, old_to = start(first), old_end - (new_end - start(last))
    if old_to < old_from or old_to - old_from > STRETCH_LIMIT:
        return None
    stretch = old[old_from:old_to]
    before: dict[bytes, bytes] = {}
    pos = 0
    while pos + 8 <= len(stretch):
        klen, dlen = struct.unpack_from("<LL", stretch, pos)
        before[stretch[pos + 8:pos + 8 + klen]] = stretch[pos + 8 + klen:pos + 8 + klen + dlen]
        pos += 8 + klen + dlen
    if pos != len(stretch):
        return None
    after = {k: (REJECT if k in rejects else b"") for k in keys[first:last]}
    return Changes(sorted(k for k in after if k not in before),
                   sorted(k for k in before if k not in new),
                   sorted(k for k in after if k in before and before[k] != after[k]))


def _common(a, b, start: int, end_a: int, end_b: int, from_end: bool = False) -> int:
    """Length of the common beginning (or end) of a[start:end_a] and b[start:end_b],
    compared a chunk at a time, then by halving inside the first chunk that differs."""
    n = min(end_a, end_b) - start

    def piece(data, end: int, lo: int, hi: int):     # bytes lo..hi counted from that side
        return data[end - hi:end - lo] if from_end else data[start + lo:start + hi]
    done = 0
    while done < n:
        size = min(CHUNK, n - done)
        x, y = piece(a, end_a, done, done + size), piece(b, end_b, done, done + size)
        if x != y:
            lo, hi = 0, size                 # the first lo bytes agree, the first hi do not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                same = x[size - mid:] == y[size - mid:] if from_end else x[:mid] == y[:mid]
                lo, hi = (mid, hi) if same else (lo, mid)
            return done + lo
        done += size
    return n


def record_count(data: bytes) -> int | None:
    """Records in a cdb, from its 2048-byte header: each of the 256 tables has twice as
    many slots as records (as cdbmake and cdbx write them).  None for a file too short
    to be a cdb."""
    if len(data) < 2048:
        return None
    return sum(struct.unpack_from("<512L", data, 0)[1::2]) // 2


LOCK_MODE = 0o600


def open_lock(lock_path: str) -> int:
    """Open (or create) a lock file only we can open: O_NOFOLLOW (a planted symlink is
    refused), a regular file owned by our uid, mode 0600.  A lock file others could open
    (an older version made it 0644: anyone could flock it and freeze every build) is
    replaced by a new one, so a descriptor opened before does not hold the new lock."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    for _ in range(3):
        try:
            fd = os.open(lock_path, flags, LOCK_MODE)
        except OSError as err:
            why = "is a symbolic link" if err.errno == errno.ELOOP else err.strerror
            raise InstallError(f"cannot open lock file: {why}", lock_path) from None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and \
                not st.st_mode & 0o077:
            return fd
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InstallError("lock file is not a regular file: remove it", lock_path)
        directory = os.path.dirname(lock_path) or "."
        tmp_fd, tmp = tempfile.mkstemp(prefix=os.path.basename(lock_path) + ".", dir=directory)
        os.close(tmp_fd)                       # mkstemp: 0600, ours
        os.replace(tmp, lock_path)
    raise InstallError("lock file keeps changing under us", lock_path)


def lock_holder(fd: int) -> str:
    """"pid N since HH:MM:SS" for whoever holds the flock on ``fd``'s file, from
    /proc/locks and the holder's start time (nothing is written into the lock file, so
    a build that changes nothing writes nothing)."""
    try:
        st = os.fstat(fd)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and dev in fields:
                    pid = int(fields[fields.index(dev) - 1])
                    break
            else:
                return "an unknown process"
    except (OSError, ValueError):
        return "an unknown process"
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(x.split()[1]) for x in f if x.startswith("btime "))
        since = boot + ticks / os.sysconf("SC_CLK_TCK")
        return f"pid {pid} since {time.strftime('%H:%M:%S', time.localtime(since))}"
    except (OSError, ValueError, IndexError, StopIteration):
        return f"pid {pid}"


def take_lock(lock_path: str, timeout: float, stop=None, what: str = "build") -> int:
    """An exclusive flock on ``lock_path``, waiting at most ``timeout`` seconds (and
    giving up at once when ``stop`` is set: SIGTERM is honoured while we wait).  The
    refusal names the holder's pid and start time (from /proc/locks).  Returns the
    descriptor; closing it releases the lock."""
    deadline = time.monotonic() + timeout
    nap = 0.02
    while True:
        fd = open_lock(lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if stop is not None and stop.is_set():
                os.close(fd)
                raise InstallError("stopping: gave up waiting for the lock", lock_path) from None
            if time.monotonic() >= deadline:
                holder = lock_holder(fd)
                os.close(fd)
                raise InstallError(f"another {what} holds the lock ({holder}); gave up after "
                                   f"{timeout:g}s", lock_path) from None
            os.close(fd)
            time.sleep(nap)
            nap = min(0.25, nap * 2)
            continue
        try:                                   # still the file at that name?
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path, follow_symlinks=False))
        except OSError:
            same = False
        if not same:
            os.close(fd)
            continue
        return fd


@contextlib.contextmanager
def locked(path: str, timeout: float = 60.0, stop=None) -> Iterator[None]:
    """An exclusive lock beside the cdb, so two builders never interleave."""
    fd = take_lock(path + ".lock", timeout, stop)
    try:
        yield
    finally:
        os.close(fd)


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


def write_cdb(f, keys: list[bytes], rejects: set[bytes]) -> None:
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


def make_cdb(keys: list[bytes], rejects: set[bytes]) -> mmap.mmap:
    """The complete cdb image, built in memory (a memfd: nothing touches the disk) and
    returned as a read-only map of it, so it is never copied."""
    fd = os.memfd_create("validrcptto.cdb") if hasattr(os, "memfd_create") else None
    f = os.fdopen(fd, "w+b") if fd is not None else tempfile.TemporaryFile()
    with f:
        write_cdb(f, keys, rejects)
        return mmap.mmap(f.fileno(), os.fstat(f.fileno()).st_size, prot=mmap.PROT_READ)


def same_content(path: str, image) -> bool | None:
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


def write_atomically(path: str, data=None, fill=None) -> None:
    """A unique temp file in the target's directory, fsync, rename over ``path``,
    fsync the directory: the live name is always the old or the new complete file.
    The content: ``data``, or what ``fill(f)`` writes into the open file."""
    directory = os.path.dirname(path) or "."
    prefix = os.path.basename(_temp_pattern(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    except OSError as err:
        raise InstallError(f"cannot create a temporary file: {err.strerror}", directory) from None
    try:
        with os.fdopen(fd, "w+b") as f:
            if fill is not None:
                fill(f)
            else:
                for offset in range(0, len(data), CHUNK):
                    f.write(data[offset:offset + CHUNK])
            f.flush()
            os.fchmod(f.fileno(), MODE)
            os.fsync(f.fileno())
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


def install_result(result, path: str, settings, force: bool = False, stop=None,
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


def install(keys: list[bytes], path: str, *, rejects: set[bytes] = frozenset(),
            present=None, max_shrink: float = 20.0, force: bool = False,
            domains: frozenset[bytes] = frozenset(), lock_timeout: float = 60.0,
            stop=None, user_keys=None, sources: dict | None = None) -> Report:
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
        if user_keys is None:
            why = gate(len(keys), old_count, max_shrink, force)
            if why:
                raise InstallRefused(why, path)
        diff = compare_live(path, keys, new, rejects, image) if old_count is not None \
            else Changes(list(keys), [], [])
        removed = diff.removed
        if user_keys is not None:
            # keys local users make in their own homes never move the gate
            count, is_new_user, is_user = user_keys
            new_user = count()
            removed = [k for k in diff.removed if not is_user(k)]
            added_user = sum(1 for k in diff.added if is_new_user(k)) if new_user else 0
            old_user = new_user - added_user + len(diff.removed) - len(removed)
            why = gate(len(keys) - new_user, None if old_count is None else old_count - old_user,
                       max_shrink, force, empty=len(keys) == 0,
                       users=(new_user, old_user))
            if why:
                raise InstallRefused(why, path)
        why = None if force else emptied(removed, new, domains)
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


class LiveChanged(InstallError):
    """The live cdb is not the file an incremental build's delta applies to."""


def install_delta(keys: list[bytes], path: str, *, rejects: set[bytes], changes: Changes,
                  expect: Ident | None, users: tuple[int, int], old_count: int,
                  removed_admin: list[bytes], new_keys, domains: frozenset[bytes],
                  sources: dict, max_shrink: float, force: bool, lock_timeout: float,
                  stop=None, started: float | None = None) -> Report:
    """Install the sorted ``keys`` of an incremental build: the previous list (whose
    file had the identity ``expect``) with ``changes`` applied.  The live file is neither
    read nor compared: the changes are known.  The same gate as ``install``:
    ``users``: (new, old) keys local users control, left out of the shrink count;
    ``removed_admin``: the removed keys that are not theirs; ``new_keys``: the changed
    domains' keys now (a domain none of them names has lost everything).  Raises
    LiveChanged when someone else replaced the live file since."""
    started = time.monotonic() if started is None else started
    check_target(path)
    why = gate(len(keys) - users[0], old_count - users[1], max_shrink, force,
               empty=len(keys) == 0, users=users)
    if not why and not force:
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
