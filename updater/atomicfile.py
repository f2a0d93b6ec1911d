"""The one way files are replaced here: a new file with an unpredictable name in the
target's directory (mkstemp: O_CREAT|O_EXCL, so a symlink planted by someone who may
write that directory is never followed), its mode set on the descriptor, written,
fsynced, renamed over the target, and the directory fsynced.  At every instant the
target's name holds the old or the new complete file; a failure removes the temp file.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from .limits import FILE_CHUNK


def temp_prefix(path: str) -> str:
    """Where the temp files of ``path`` start: ``DIR/.NAME.tmp.``"""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.tmp.")


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(path: str, data: bytes | str | memoryview | mmap.mmap | None = None,
            fill: Callable[[BinaryIO], None] | None = None, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (or what ``fill(f)`` writes into the open file).
    Raises OSError, leaving ``path`` as it was."""
    prefix = temp_prefix(path)
    directory = os.path.dirname(prefix)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(prefix), dir=directory)
    try:
        with os.fdopen(fd, "w+b") as f:
            os.fchmod(f.fileno(), mode)
            if fill is not None:
                fill(f)
            elif data is not None:
                raw = data.encode() if isinstance(data, str) else data
                for offset in range(0, len(raw), FILE_CHUNK):
                    f.write(raw[offset:offset + FILE_CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
