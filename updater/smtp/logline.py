"""validrcptto-smtpd's name and log (``updater.logline``)."""

from __future__ import annotations

from ..logline import logger

PROG = "validrcptto-smtpd"
log = logger(PROG)
