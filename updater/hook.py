"""``qmail-updater install-hook``: put vpopmail's onchange hook in place as root, in a
directory the vpopmail user owns, without ever writing through a link planted there.

The hook is written to a new file of an unpredictable name created with O_EXCL in that
directory (``atomicfile.replace``: a link planted at that name makes the create fail,
never followed), its mode set on the descriptor, and renamed over ``onchange`` (a
rename replaces a link named ``onchange`` itself; it never writes where the link
points).  The file that is there is compared without following a link."""

from __future__ import annotations

import os
import re
import stat

from . import atomicfile
from .errors import InstallError

MODE = 0o755
MAX_HOOK = 1 << 16
_FIFO_LINE = re.compile(r"^FIFO=.*$", re.M)


def hook_text(template: str, fifo: str) -> str:
    """The shipped hook with its FIFO line pointed at ``fifo`` (pure)."""
    if not _FIFO_LINE.search(template):
        raise ValueError("the template has no FIFO= line")
    if any(c in fifo for c in '"$`\\\n'):
        raise ValueError(f"the FIFO path may not hold shell quoting: {fifo!r}")
    return _FIFO_LINE.sub(f'FIFO="${{UPDATER_FIFO:-{fifo}}}"', template, count=1)


def current(path: str) -> bytes | None:
    """What ``path`` holds now, if it is our kind of file: a regular file, not followed
    through a link, bounded; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != MODE:
            return None
        return os.read(fd, MAX_HOOK + 1)
    finally:
        os.close(fd)


def install_hook(template_path: str, fifo: str, path: str) -> bool:
    """Install the hook at ``path``; False when it is already there as it would be
    written.  InstallError naming the file on failure."""
    try:
        with open(template_path, encoding="utf-8") as f:
            template = f.read(MAX_HOOK)
        data = hook_text(template, fifo).encode()
    except OSError as err:
        raise InstallError(f"cannot read the hook: {err.strerror}", template_path) from None
    except ValueError as err:
        raise InstallError(str(err), template_path) from None
    if current(path) == data:
        return False
    try:
        atomicfile.replace(path, data, mode=MODE)
    except OSError as err:
        raise InstallError(f"cannot write: {err.strerror or err}", path) from None
    return True
