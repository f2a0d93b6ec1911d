"""validrcptto-smtpd's name and its log function (made by ``serving.logline``)."""

from __future__ import annotations

from ..serving.logline import logger

PROG = "validrcptto-smtpd"
log = logger(PROG)
