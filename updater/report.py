"""``qmail-updater report``: what validrcptto-smtpd refused, from its multilog files.

For admins without Prometheus.  Reads lines as multilog writes them (``@`` + a TAI64N
label, a space, the line; lines without a label are taken as recent), keeps those since
a moment, and counts: recipients refused by the list (and the domains they were for:
counts only, never an address), sessions hung up (too many invalid recipients, too many
AUTH failures), AUTH failures, connections denied by the rules and refused as busy.
Pure apart from reading the files; every line is bounded and what is printed comes
from our own log format (the domain part is printed escaped).
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .limits import REPORT_CHUNK, REPORT_LINE_MAX, REPORT_MAX_DOMAINS

_TAI = re.compile(r"@([0-9a-f]{16})[0-9a-f]{8} ")
_NOT_FOUND = re.compile(r"validrcptto \[[^\]]*\] not found: (.*)$")
_NOT_OURS = re.compile(r"validrcptto \[[^\]]*\] not in rcpthosts: ")
_HANGUP = re.compile(r"validrcptto \[[^\]]*\] excessive violations, hanging up$")
_AUTH_FAILED = re.compile(r"AUTH failed user ")
_AUTH_LIMIT = re.compile(r"too many authentication failures")
_DENY = re.compile(r"\]: deny \d+ ")
_BUSY = re.compile(r"\]: busy \d+ ")
_OK = re.compile(r"\]: ok \d+ ")


def tai64n(label: str) -> float:
    """Seconds since the epoch of a TAI64N label's first 16 hex digits (TAI is 10 s
    ahead of UTC in the label, as tai64nlocal counts it)."""
    return int(label, 16) - (1 << 62) - 10


def since(text: str, now: float | None = None) -> float:
    """``24h``, ``90m``, ``7d``, ``3600`` (seconds) -> the moment that long ago."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not m:
        raise ValueError(f"expected a duration like 24h, 90m, 7d: {text!r}")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return (time.time() if now is None else now) - float(m.group(1)) * scale


@dataclass
class Report:
    rejected: int = 0
    not_ours: int = 0               # RCPT to a domain not in rcpthosts (relaying refused)
    domains: Counter[str] = field(default_factory=Counter)
    hangups_invalid: int = 0
    hangups_auth: int = 0
    auth_failed: int = 0
    sessions: int = 0
    denied: int = 0
    busy: int = 0
    first: float | None = None
    last: float | None = None
    skipped: int = 0                # lines over REPORT_LINE_MAX bytes, not looked at

    def add(self, line: str, when: float | None) -> None:
        if when is not None:
            self.first = when if self.first is None else min(self.first, when)
            self.last = when if self.last is None else max(self.last, when)
        m = _NOT_FOUND.search(line)
        if m:
            self.rejected += 1
            address = m.group(1)
            at = address.rfind("@")
            domain = address[at + 1:].lower() if at != -1 else "(no domain)"
            if domain not in self.domains and len(self.domains) >= REPORT_MAX_DOMAINS:
                domain = "(other domains)"
            self.domains[domain] += 1
        elif _NOT_OURS.search(line):
            self.not_ours += 1
        elif _HANGUP.search(line):
            self.hangups_invalid += 1
        elif _AUTH_FAILED.search(line):
            self.auth_failed += 1
        elif _AUTH_LIMIT.search(line):
            self.hangups_auth += 1
        elif _OK.search(line):
            self.sessions += 1
        elif _DENY.search(line):
            self.denied += 1
        elif _BUSY.search(line):
            self.busy += 1

    def lines(self, top: int = 10) -> list[str]:
        fmt = "%Y-%m-%d %H:%M:%S"
        span = (f"{time.strftime(fmt, time.localtime(self.first))} to "
                f"{time.strftime(fmt, time.localtime(self.last))}") if self.first else "-"
        out = [f"period:               {span}",
               f"sessions:             {self.sessions}",
               f"recipients refused:   {self.rejected} (not in the validrcptto list), "
               f"{self.not_ours} (domain not in rcpthosts)",
               f"hung up:              {self.hangups_invalid} (too many invalid recipients), "
               f"{self.hangups_auth} (too many AUTH failures)",
               f"AUTH failures:        {self.auth_failed}",
               f"connections refused:  {self.denied} (rules), {self.busy} (limits)"]
        if self.skipped:
            out.append(f"lines skipped:        {self.skipped} "
                       f"(longer than {REPORT_LINE_MAX} bytes)")
        if self.domains:
            out.append(f"refused recipients by domain (top {top}):")
            for domain, n in self.domains.most_common(top):
                out.append(f"  {n:>8}  {domain}")
        return out




def log_lines(path: str, report: Report) -> Iterator[str]:
    """The lines of one log file, read a chunk at a time: a regular file only (opened
    without blocking: a FIFO or a device is refused, never waited on or read for
    ever), lines longer than REPORT_LINE_MAX skipped and counted (``report.skipped``), so
    memory stays bounded whatever the file holds.  OSError names what is wrong."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(22, "not a regular file", path)
        buf, skipping = b"", False
        while True:
            chunk = os.read(fd, REPORT_CHUNK)
            if not chunk:
                break
            buf += chunk
            *whole, buf = buf.split(b"\n")
            for line in whole:
                if skipping:                        # the rest of an overlong line
                    skipping = False
                    continue
                if len(line) > REPORT_LINE_MAX:
                    report.skipped += 1
                    continue
                yield line.decode("utf-8", "replace")
            if len(buf) > REPORT_LINE_MAX:
                if not skipping:
                    report.skipped += 1
                buf, skipping = b"", True
        if buf and not skipping:
            yield buf.decode("utf-8", "replace")
    finally:
        os.close(fd)


def read(lines: Iterable[str], start: float | None, report: Report | None = None) -> Report:
    report = report or Report()
    for line in lines:
        line = line[:REPORT_LINE_MAX].rstrip("\n")
        when = None
        m = _TAI.match(line)
        if m:
            when = tai64n(m.group(1))
            if start is not None and when < start:
                continue
            line = line[m.end():]
        report.add(line, when)
    return report
