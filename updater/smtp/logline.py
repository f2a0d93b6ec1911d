"""validrcptto-smtpd's log: one line per event on stderr (multilog adds the time),
``validrcptto-smtpd[PID]: TEXT``, written with one write() so lines never interleave."""

from __future__ import annotations

import os

PROG = "validrcptto-smtpd"


def log(text: str) -> None:
    try:
        os.write(2, f"{PROG}[{os.getpid()}]: {text}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass
