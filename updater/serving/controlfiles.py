"""qmail's control files as qmail-smtpd reads them (control.c's rules, as bytes), for
both servers.

These readers follow control_readline / control_readfile / control_readint exactly
(first line only, trailing space/tab/LF stripped, no comment handling in single-line
files), which differs in small ways from the generator's line-numbered readers in
``updater.build.qmail``; they stay free of heavy imports, because the tcpserver front end runs
them once per connection.  Every read is bounded, regular files only.
"""

from __future__ import annotations

import os
import stat

from ..limits import CONTROL_READ_MAX
from ..smtp.context import scan_ulong


class ControlError(Exception):
    """A control file exists but cannot be read: ``421 unable to read controls``."""


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ControlError(f"{path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ControlError(f"{path}: not a regular file")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            total += len(chunk)
            if total > CONTROL_READ_MAX:
                raise ControlError(f"{path}: larger than {CONTROL_READ_MAX} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as err:
        raise ControlError(f"{path}: {err.strerror}") from None
    finally:
        os.close(fd)


def readline(path: str) -> bytes | None:
    """control_readline: the first line, trailing spaces/tabs removed; None if absent."""
    data = _read(path)
    if data is None:
        return None
    return data.split(b"\n", 1)[0].rstrip(b" \t")


def readfile(path: str) -> list[bytes] | None:
    """control_readfile: every non-empty line not starting with ``#``, trailing
    spaces/tabs removed; None if absent."""
    data = _read(path)
    if data is None:
        return None
    out = []
    for line in data.split(b"\n"):
        line = line.rstrip(b" \t")
        if line and not line.startswith(b"#"):
            out.append(line)
    return out


def readint(path: str, default: int) -> int:
    """control_readint: leading digits of the first line; the default when the file is
    absent or has no digits."""
    line = readline(path)
    if line is None or not line[:1].isdigit():
        return default
    return scan_ulong(line)


def morercpthosts_path(qmail_dir: str) -> str:
    return os.path.join(qmail_dir, "control", "morercpthosts.cdb")
