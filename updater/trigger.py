"""``qmail-updater trigger``: one line to the daemon's FIFO, without argparse (it must
return to vpopmail, or any caller, within 100 ms, daemon or not)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from . import __version__

EXIT_OK = 0


def trigger(argv: Sequence[str], log: Callable[[str], None]) -> int:
    """``trigger [--fifo PATH] [--qmail-dir DIR] [REASON...]`` without importing argparse:
    it must return to vpopmail (or any caller) within 100 ms, daemon or not."""
    fifo = os.environ.get("UPDATER_FIFO") or ""
    qmail_dir = os.environ.get("QMAIL_DIR") or "/var/qmail"
    words: list[str] = []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("--fifo", "--qmail-dir") and args:
            if a == "--fifo":
                fifo = args.pop(0)
            else:
                qmail_dir = args.pop(0)
        elif a.startswith("--fifo="):
            fifo = a.split("=", 1)[1]
        elif a.startswith("--qmail-dir="):
            qmail_dir = a.split("=", 1)[1]
        elif a in ("-h", "--help"):
            sys.stdout.write(TRIGGER_HELP)
            return EXIT_OK
        elif a == "--version":
            sys.stdout.write(f"qmail-updater {__version__}\n")
            return EXIT_OK
        else:
            words.append(a)
    from .daemon.fifo import send
    status, warning = send(fifo or os.path.join(qmail_dir, "control", "validrcptto.trigger"),
                           " ".join(words))
    if warning:
        log(f"warning: {warning}")
    return status


TRIGGER_HELP = """usage: qmail-updater trigger [--fifo PATH] [--qmail-dir DIR] [REASON...]

Ask the daemon for a build: one line (REASON, default "trigger") written to its trigger
FIFO with a non-blocking open.  It never waits, daemon or not.

options:
  --fifo PATH      the trigger FIFO (default: $UPDATER_FIFO, else
                   QMAIL_DIR/control/validrcptto.trigger)
  --qmail-dir DIR  qmail's home (default: $QMAIL_DIR, else /var/qmail)
  -h, --help       show this help and exit
  --version        show the version and exit

exit status: 0 written; 3 no daemon is reading the FIFO; 4 the FIFO does not exist;
5 permission denied (not in the FIFO's group); 6 the path is not a FIFO, or another
error.
"""
