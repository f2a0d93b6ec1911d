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


def send(path: str, reason: str) -> str | None:
    """Write one trigger; returns a warning when no daemon got it (never raises)."""
    data = (reason.replace("\n", " ").strip()[:400] or "trigger").encode(
        "utf-8", "surrogateescape") + b"\n"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist: is qmail-updater run down? (nothing triggered)"
    except OSError as err:
        return f"{path}: {err.strerror} (nothing triggered)"
    if not stat.S_ISFIFO(st.st_mode):
        return f"{path} is not a FIFO (nothing triggered)"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ENXIO:
            return f"no daemon is reading {path} (nothing triggered)"
        return f"{path}: {err.strerror} (nothing triggered)"
    try:
        os.write(fd, data)
    except BlockingIOError:
        pass                     # the pipe is full: a build is pending already
    except OSError as err:
        return f"{path}: {err.strerror} (nothing triggered)"
    finally:
        os.close(fd)
    return None


class Reader:
    """The daemon's end: created if missing, replaced if the path is not a FIFO,
    recreated if deleted while we run."""

    def __init__(self, path: str, mode: int, warn):
        self.path, self.mode, self.warn = path, mode, warn
        self.fd = -1
        self.ino: tuple[int, int] | None = None
        self.open()

    def open(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISFIFO(st.st_mode):
            self.warn(f"{self.path} is not a FIFO: replacing it with one")
            os.unlink(self.path)
            st = None
        if st is None:
            os.mkfifo(self.path)
            os.chmod(self.path, self.mode)          # exactly the mode, whatever the umask
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        st = os.fstat(self.fd)
        self.ino = (st.st_dev, st.st_ino)

    def check(self) -> None:
        """Recreate the FIFO when its path was removed or replaced."""
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self.ino and stat.S_ISFIFO(st.st_mode)
        except FileNotFoundError:
            same = False
        if not same:
            self.warn(f"{self.path} was removed or replaced: recreating the FIFO")
            self.open()

    def read(self, keep: int = 4096, drain: int = 1 << 20) -> bytes:
        """What was written since the last call (many writes coalesce into one request):
        at most ``keep`` bytes are kept and at most ``drain`` bytes read per call, so a
        writer that never stops (``cat /dev/zero > FIFO``) costs neither memory nor an
        endless loop; the rest is read at the next wake-up."""
        kept = bytearray()
        total = 0
        while total < drain:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            total += len(chunk)
            if len(kept) < keep:
                kept += chunk[:keep - len(kept)]
        return bytes(kept)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
