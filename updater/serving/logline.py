"""The servers' log lines: one event per line on stderr (multilog adds the time),
``PROG[PID]: TEXT``, written with one write() so lines of several processes never
interleave; a log that cannot be written never stops the server.  Text from others is
escaped by the caller (``textsafe.escape``)."""

from __future__ import annotations

import os
from collections.abc import Callable


def logger(prog: str) -> Callable[[str], None]:
    """The log function of program ``prog`` (the pid is read at each line: workers fork)."""
    def log(text: str) -> None:
        try:
            os.write(2, f"{prog}[{os.getpid()}]: {text}\n".encode("utf-8", "backslashreplace"))
        except OSError:
            pass
    return log
