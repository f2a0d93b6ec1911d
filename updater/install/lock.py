"""Build locks: an exclusive flock on a file only we can open, beside the cdb (two
builders never interleave; one daemon per tree)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator

from ..errors import InstallError

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
            why = "is a symbolic link" if err.errno == errno.ELOOP else (err.strerror or str(err))
            if err.errno == errno.EACCES:        # the daemon as UPDATER_USER, say
                why += (" (this user may not write the cdb's directory: give it one of "
                        "its own for the cdb, status and FIFO: DAEMON_USER=USER sh service/deploy "
                        "does it, docs/deploy.md)")
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
    except OSError:
        return "an unknown process"
    return holder_of(st) or "an unknown process"


def daemon_holder(lock_path: str) -> str | None:
    """Who holds the daemon's lock now ("pid N since HH:MM:SS"), or None when no one
    does: whether ``qmail-updater run`` is running, found without opening the lock file
    (which only its owner may open)."""
    try:
        st = os.stat(lock_path, follow_symlinks=False)
    except OSError:
        return None
    return holder_of(st) if stat.S_ISREG(st.st_mode) else None


def holder_of(st: os.stat_result) -> str | None:
    try:
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and dev in fields and "->" not in fields:
                    pid = int(fields[fields.index(dev) - 1])
                    break
            else:
                return None
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(x.split()[1]) for x in f if x.startswith("btime "))
        since = boot + ticks / os.sysconf("SC_CLK_TCK")
        return f"pid {pid} since {time.strftime('%H:%M:%S', time.localtime(since))}"
    except (OSError, ValueError, IndexError, StopIteration):
        return f"pid {pid}"


def take_lock(lock_path: str, timeout: float, stop: threading.Event | None = None,
              what: str = "build") -> int:
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
def locked(path: str, timeout: float,
           stop: threading.Event | None = None) -> Iterator[None]:
    """An exclusive lock beside the cdb, so two builders never interleave (``timeout``:
    UPDATER_LOCK_TIMEOUT, declared in config)."""
    fd = take_lock(path + ".lock", timeout, stop)
    try:
        yield
    finally:
        os.close(fd)
