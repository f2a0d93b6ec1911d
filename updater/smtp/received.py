"""The Received header field qmail-smtpd prepends to a message (pure)."""

from __future__ import annotations

import re


def _safe(value: bytes) -> bytes:
    return _UNSAFE.sub(b"?", value)


_UNSAFE = re.compile(rb"[^A-Za-z0-9.@%+/=:\-]")
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct",
           b"Nov", b"Dec")


def date822(when: float) -> bytes:
    """qmail's date822fmt: ``25 Nov 2026 19:09:31 -0000`` (UTC, day not zero-padded)."""
    import time
    t = time.gmtime(int(when))
    return b"%d %s %d %02d:%02d:%02d -0000" % (t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year,
                                                t.tm_hour, t.tm_min, t.tm_sec)


def received_line(local: bytes, remoteip: bytes, remotehost: bytes, remoteinfo: bytes | None,
                  helo: bytes | None, when: float, proto: bytes = b"SMTP") -> bytes:
    """The header qmail-smtpd's received() prepends (protocol SMTP; with TLS or AUTH,
    RFC 3848's ESMTPS, ESMTPA, ESMTPSA)."""
    line = b"Received: from " + _safe(remotehost)
    if helo is not None:
        line += b" (HELO " + _safe(helo) + b")"
    line += b" ("
    if remoteinfo is not None:
        line += _safe(remoteinfo) + b"@"
    return line + _safe(remoteip) + b")\n  by " + _safe(local) + b" with " + proto + b"; " + \
        date822(when) + b"\n"


def protocol(tls: bool, authed: bool) -> bytes:
    """The ``with`` word: SMTP, or RFC 3848's ESMTPS, ESMTPA, ESMTPSA."""
    if not (tls or authed):
        return b"SMTP"
    return b"ESMTP" + (b"S" if tls else b"") + (b"A" if authed else b"")
