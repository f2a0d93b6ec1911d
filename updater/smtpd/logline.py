"""validrcptto-smtpd's name and log (``updater.logline``)."""

from __future__ import annotations

from ..serving.logline import logger

PROG = "validrcptto-smtpd"
log = logger(PROG)
