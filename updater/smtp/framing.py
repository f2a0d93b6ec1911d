"""qmail-smtpd's command lines, cut from the session's buffer (pure): a line ends at LF;
one longer than COMMAND_LINE_MAX is answered ``500`` and skipped, however it arrives."""

from __future__ import annotations

from ..limits import COMMAND_LINE_MAX

TOO_LONG = b"\0too long"       # a marker (no command line holds a NUL: it ends at one)


def next_line(buf: bytes, pos: int, discarding: bool) -> tuple[bytes | None, int, bool]:
    """(the line at ``pos`` without its LF, or TOO_LONG, or None when no complete line
    is there; the position after it; whether the rest of an over-long line is being
    skipped).  ``discarding``: the previous call left an over-long line unfinished."""
    n = len(buf)
    nl = buf.find(b"\n", pos)
    if discarding:                                   # the rest of an over-long line
        if nl == -1:
            return None, n, True
        return TOO_LONG, nl + 1, False
    if nl == -1:
        if n - pos > COMMAND_LINE_MAX:
            return None, n, True
        return None, pos, False
    if nl - pos > COMMAND_LINE_MAX:
        return TOO_LONG, nl + 1, False
    return buf[pos:nl], nl + 1, False
