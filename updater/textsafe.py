"""Bytes from others (the FIFO, a status file, rsync's errors) made safe for one log or
terminal line.  A leaf module: it imports nothing of ours."""

from __future__ import annotations


def printable(data: bytes, backslash: bool = True) -> str:
    """Printable ASCII as is, the rest as \\xNN (a backslash too, unless ``backslash``
    is False: for text escaped before), so no terminal escape or forged line gets
    through."""
    return "".join(chr(b) if 32 <= b < 127 and (b != 92 or not backslash) else f"\\x{b:02x}"
                   for b in data)


def escape(data: bytes, limit: int = 300) -> str:
    """Client bytes for a log line: ``printable`` (backslash too), cut at ``limit``."""
    return printable(data[:limit]) + ("..." if len(data) > limit else "")
