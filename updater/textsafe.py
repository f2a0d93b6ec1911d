"""Bytes from others (the FIFO, a status file, rsync's errors) made safe for one log or
terminal line.  A leaf module: it imports nothing of ours."""

from __future__ import annotations


def printable(data: bytes, backslash: bool = True) -> str:
    """Printable ASCII as is, the rest as \\xNN (a backslash too, unless ``backslash``
    is False: for text escaped before), so no terminal escape or forged line gets
    through."""
    return "".join(chr(b) if 32 <= b < 127 and (b != 92 or not backslash) else f"\\x{b:02x}"
                   for b in data)


def escape(data: bytes | str, limit: int = 300) -> str:
    """Others' bytes (or text) for a log line, cut at ``limit``: bytes through
    ``printable`` (backslash too); text keeps printable and non-ASCII letters, control
    characters become \\xNN."""
    if isinstance(data, str):
        out = "".join(c if " " <= c < "\x7f" or c > "\xa0" else f"\\x{ord(c) & 0xff:02x}"
                      for c in data[:limit])
    else:
        out = printable(data[:limit])
    return out + ("..." if len(data) > limit else "")
