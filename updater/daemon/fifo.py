"""The trigger FIFO: both ends.

Writers (``qmail-updater trigger``, vpopmail's onchange hook) open it
``O_WRONLY|O_NONBLOCK``: with no reader that fails at once with ENXIO instead of
blocking the caller forever.  The daemon holds it open read-write, so it never sees EOF
(no busy loop after a writer closes) and there is never a moment without a reader.
Kept free of heavy imports: ``trigger`` must return within 100 ms.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

# ``qmail-updater trigger`` exit statuses (the onchange hook says the same and exits 0)
SENT, NO_READER, MISSING, DENIED, BROKEN = 0, 3, 4, 5, 6


def send(path: str, reason: str) -> tuple[int, str | None]:
    """Write one trigger, never blocking: (status, what went wrong or None)."""
    data = (reason.replace("\n", " ").strip()[:400] or "trigger").encode(
        "utf-8", "surrogateescape") + b"\n"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return MISSING, (f"{path} does not exist: is qmail-updater run running, with this "
                         "QMAIL_DIR? (nothing triggered)")
    except OSError as err:
        return BROKEN, f"{path}: {err.strerror} (nothing triggered)"
    if not stat.S_ISFIFO(st.st_mode):
        return BROKEN, f"{path} is not a FIFO (nothing triggered)"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ENXIO:
            return NO_READER, (f"no daemon is reading {path}: is qmail-updater run down? "
                               "(nothing triggered)")
        if err.errno in (errno.EACCES, errno.EPERM):
            return DENIED, (f"permission denied writing {path}: this user is not in its "
                            "group (UPDATER_FIFO_GROUP) (nothing triggered)")
        return BROKEN, f"{path}: {err.strerror} (nothing triggered)"
    try:
        os.write(fd, data)
    except BlockingIOError:
        pass                     # the pipe is full: a build is pending already
    except OSError as err:
        return BROKEN, f"{path}: {err.strerror} (nothing triggered)"
    finally:
        os.close(fd)
    return SENT, None


def fifo_gid(group: str, warn: Callable[[str], None]) -> int:
    """The FIFO's group.  ``group`` named: that group (one that does not exist is one
    warning, and the daemon's own group).  Unset: the group of the ``vpopmail``
    account, as vpopmail installs make it (``useradd -g vchkpw vpopmail``), else the
    group ``vchkpw``, else the daemon's own."""
    import grp
    import pwd
    if group:
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            warn(f"UPDATER_FIFO_GROUP: there is no group {group!r}: the trigger FIFO gets "
                 "the daemon's own group, and vpopmail's onchange hook cannot write it")
            return os.getegid()
    try:
        return pwd.getpwnam("vpopmail").pw_gid
    except KeyError:
        pass
    try:
        return grp.getgrnam("vchkpw").gr_gid
    except KeyError:
        return os.getegid()


class Reader:
    """The daemon's end: created if missing (a regular file at the path is replaced),
    recreated if deleted while we run, always with our mode and group.  A path we cannot
    turn into a FIFO (a directory, say) is reported once and retried: the daemon keeps
    running on file watches and the safety net meanwhile."""

    RETRY = 30.0

    def __init__(self, path: str, mode: int, warn: Callable[[str], None], group: str = ""):
        self.path, self.mode, self.warn = path, mode, warn
        self.gid = fifo_gid(group, warn)
        self.fd = -1
        self.ino: tuple[int, int] | None = None
        self.problem: str | None = None
        self.retry_at = 0.0
        self.open()

    def open(self) -> bool:
        """(Re)open the FIFO; False (reported once) when it cannot be had."""
        import time
        try:
            self._open()
        except OSError as err:
            problem = f"{self.path}: {err.strerror or err}"
            if isinstance(err, IsADirectoryError) or (
                    err.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EPERM)):
                problem = f"{self.path} is a directory, not a FIFO"
            if problem != self.problem:
                self.warn(f"{problem}: no triggers until it is fixed (retrying every "
                          f"{self.RETRY:g}s; file watches and the safety net go on)")
            self.problem = problem
            self.retry_at = time.monotonic() + self.RETRY
            if self.fd >= 0:
                os.close(self.fd)
            self.fd = -1
            return False
        if self.problem is not None:
            self.warn(f"{self.path}: the trigger FIFO works again")
        self.problem = None
        return True

    def _open(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if st is not None and (not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid()):
            self.warn(f"{self.path} is not our FIFO: replacing it with one")
            os.unlink(self.path)
            st = None
        if st is None:
            os.mkfifo(self.path, 0o600)
        fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISFIFO(st.st_mode):
                raise OSError(errno.EINVAL, "not a FIFO")
            if st.st_gid != self.gid:
                os.fchown(fd, -1, self.gid)
            os.fchmod(fd, self.mode)            # exactly the mode, whatever the umask
        except BaseException:
            os.close(fd)
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        self.ino = (st.st_dev, st.st_ino)

    def check(self) -> None:
        """Recreate the FIFO when its path was removed or replaced; retry a broken one."""
        import time
        if self.fd < 0:
            if time.monotonic() >= self.retry_at:
                self.open()
            return
        try:
            st = os.stat(self.path, follow_symlinks=False)
            same = (st.st_dev, st.st_ino) == self.ino and stat.S_ISFIFO(st.st_mode)
        except FileNotFoundError:
            same = False
        if not same:
            self.warn(f"{self.path} was removed or replaced: recreating the FIFO")
            self.open()

    def read(self, keep: int = 4096, drain: int = 1 << 20) -> tuple[bytes, int]:
        """What was written since the last call (many writes coalesce into one request):
        the last ``keep`` bytes of at most ``drain`` bytes read per call, so a writer
        that never stops (``cat /dev/zero > FIFO``) costs neither memory nor an endless
        loop; the rest is read at the next wake-up.  NUL bytes carry nothing and are
        dropped.  Returns (the bytes kept, how many others were dropped): a caller never
        loses a trigger silently (the daemon turns a drop into a full build)."""
        kept = b""
        dropped = 0
        total = 0
        while total < drain:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            total += len(chunk)
            chunk = chunk.replace(b"\0", b"")
            if chunk:
                both = kept + chunk
                dropped += max(0, len(both) - keep)
                kept = both[-keep:]
        return kept, dropped

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
