"""Addresses as qmail-smtpd reads them (pure): addrparse, rcpthosts (with
morercpthosts.cdb), badmailfrom, and the validrcptto.cdb lookup with its log lines (the
lookup itself is ``checker.check``, the one the CLI's ``check`` uses too)."""

from __future__ import annotations

import re
from collections.abc import Callable

from ..checker import check, lower
from ..limits import TRY_LOG_MAX
from ..textsafe import escape
from .replies import Acceptance, Refusal

_IPLIT = re.compile(rb"\[([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)\]\Z")


def addrparse(arg: bytes, liphost: bytes | None = None,
              ipme: Callable[[tuple[int, int, int, int]], bool] | None = None) -> bytes | None:
    """qmail-smtpd's addrparse: the address between <...> (else after the colon, up to a
    space), a source route dropped, quotes and backslashes removed; ``box@[a.b.c.d]`` of
    one of this host's IPs becomes ``box@LIPHOST``.  None when 900 bytes or longer."""
    i = arg.find(b"<")
    if i != -1:
        terminator = 62                                # '>'
        arg = arg[i + 1:]
    else:
        terminator = 32                                # ' '
        j = arg.find(b":")
        arg = arg[j + 1:] if j != -1 else b""
        arg = arg.lstrip(b" ")
    if arg[:1] == b"@":                                # strip source route
        j = arg.find(b":")
        arg = arg[j + 1:] if j != -1 else b""
    if 34 not in arg and 92 not in arg:                # fast path: nothing to unquote
        j = arg.find(bytes((terminator,)))
        out = arg if j == -1 else arg[:j]
    else:
        buf = bytearray()
        escaped = quoted = False
        for ch in arg:
            if escaped:
                buf.append(ch)
                escaped = False
            elif not quoted and ch == terminator:
                break
            elif ch == 92:
                escaped = True
            elif ch == 34:
                quoted = not quoted
            else:
                buf.append(ch)
        out = bytes(buf)
    if liphost is not None:
        at = out.rfind(b"@")
        if at != -1:
            m = _IPLIT.match(out, at + 1)
            if m and ipme is not None:
                a, b, c, d = (int(x) & 0xFF for x in m.groups())
                if ipme((a, b, c, d)):
                    out = out[:at + 1] + liphost
    if len(out) + 1 > 900:
        return None
    return out


def host_suffixes(domain: bytes) -> list[bytes]:
    """The domain and each ``.parent`` suffix, as rcpthosts matches them."""
    return [domain] + [domain[j:] for j in range(1, len(domain)) if domain[j] == 46]


def rcpthosts_allows(address: bytes, hosts: frozenset[bytes] | None,
                     more: Callable[[bytes], bytes | None] | None) -> bool:
    """qmail's rcpthosts(): no rcpthosts file allows everything; an address without ``@``
    is allowed; else the lowercased domain, or a ``.suffix`` of it, must be in rcpthosts
    or morercpthosts.cdb."""
    if hosts is None:
        return True
    at = address.rfind(b"@")
    if at == -1:
        return True
    domain = address[at + 1:].lower()
    if not domain:
        return False
    keys = host_suffixes(domain)
    if any(k in hosts for k in keys):
        return True
    return more is not None and any(more(k) is not None for k in keys)


def badmailfrom(address: bytes, bmf: frozenset[bytes] | None) -> bool:
    """The whole address or its ``@domain`` is listed (case-insensitively)."""
    if not bmf:
        return False
    a = address.lower()
    if a in bmf:
        return True
    at = a.rfind(b"@")
    return at != -1 and a[at:] in bmf


def validrcptto(get: Callable[[bytes], bytes | None], addr: bytes,
                loglevel: int) -> tuple[bool, list[str]]:
    """The validrcptto.cdb lookup (REFERENCE §1: the first key found decides) and what
    VALIDRCPTTO_LOG 1 and 2 log about it (the "not found" line always)."""
    verdict = check(get, addr)
    logs = []
    if loglevel >= 1:
        logs.append(f"RCPT TO: {escape(lower(addr))}")
    if loglevel >= 2:
        logs += [f"trying: {escape(key)}" for key in verdict.tried[:TRY_LOG_MAX]]
        if len(verdict.tried) > TRY_LOG_MAX:
            logs.append(f"trying: ({len(verdict.tried) - TRY_LOG_MAX} more keys not logged)")
    if verdict.key is not None and loglevel >= 1:
        logs.append(f"{'found' if verdict.accepted else 'reject'}: {escape(verdict.key)}")
    if not verdict.accepted:
        logs.append(f"not found: {escape(addr)}")
    return bool(verdict.accepted), logs


def recipient(addr: bytes, rcpthosts: frozenset[bytes] | None,
              more: Callable[[bytes], bytes | None] | None,
              lookup: Callable[[bytes], bytes | None] | None,
              loglevel: int) -> tuple[Refusal | Acceptance, list[str]]:
    """A recipient no RELAYCLIENT or AUTH lets through, judged as qmail-smtpd with the
    validrcptto patch judges it: (verdict, log texts).  Refused: not in rcpthosts (the
    log names the domain only) or not in validrcptto.cdb; accepted by rcpthosts alone
    (no cdb) or by validrcptto.cdb."""
    if not rcpthosts_allows(addr, rcpthosts, more):
        return Refusal.RCPTHOSTS, [
            "not in rcpthosts: " + escape(addr[addr.rfind(b"@") + 1:])]
    if lookup is None:
        return Acceptance.RCPTHOSTS, []
    ok, logs = validrcptto(lookup, addr, loglevel)
    return (Acceptance.VALIDRCPTTO if ok else Refusal.VALIDRCPTTO), logs
